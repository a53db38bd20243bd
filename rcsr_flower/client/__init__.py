"""The ClientApp's work: message handlers, the node's state store, the client's data,
the local training step and its losses (§4), and the node's warm worker."""
