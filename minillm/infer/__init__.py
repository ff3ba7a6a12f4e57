"""Inference: batched generation with a preallocated KV cache, and the HTTP server around it."""
