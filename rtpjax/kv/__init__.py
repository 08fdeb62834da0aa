"""The KV cache: device arrays, block accounting with the prefix cache, and blocks that leave or enter the device."""
