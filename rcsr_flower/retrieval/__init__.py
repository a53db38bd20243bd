"""Cross-modal retrieval shared by server and clients: the evaluation of a split (§6),
its metrics, the zero-shot memo and the prototypes (§3)."""
