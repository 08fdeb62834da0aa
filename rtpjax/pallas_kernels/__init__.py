"""Pallas GPU kernels. rtpjax.attention.IMPLEMENTATIONS["pallas"] calls ragged_paged_attention from here."""
