"""The host side of the data path: a request is validated, scheduled step by step, and its tokens become outputs."""
