"""The OpenAI-compatible HTTP server (Starlette + uvicorn), shipped as rtpjax.serve."""
