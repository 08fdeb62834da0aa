"""KV tiers below the device's prefix cache: host memory (host.py) and disk (disk.py), keyed by the chained block hashes
of kv/block_pool.py; manager.py moves blocks between them and the device off the engine's thread, build.py makes them
from the engine's options."""
