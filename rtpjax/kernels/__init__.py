"""The Pallas GPU kernels (attention, KV writes, grouped matmuls, inline PTX), each checked against a plain-jnp
reference, and what their default tilings assume of the GPU."""

SMS = 132  # streaming multiprocessors of the GPUs the default tilings were measured on (H100 SXM, H200)
