"""Device meshes and the partition rules that place parameters and the KV cache on them."""
