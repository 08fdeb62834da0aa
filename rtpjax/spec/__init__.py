"""Speculative decoding: proposers guess the next tokens on the host, the target model verifies them in one step."""
