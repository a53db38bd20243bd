"""Starting and stopping Flower: the simulation launcher, the deployment toolkit, the
Ray head and FAB staging, and the process helpers they share."""
