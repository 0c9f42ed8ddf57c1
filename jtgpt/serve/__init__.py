"""Serving: the paged KV cache's page allocator and prefix cache (jtgpt.serve.pages)."""
from jtgpt.serve.pages import OutOfPages, PageAllocator

__all__ = ["OutOfPages", "PageAllocator"]
