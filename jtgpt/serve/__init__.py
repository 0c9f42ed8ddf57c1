"""Serving, in separate rooms: the paged KV cache's page allocator and prefix cache
(jtgpt.serve.pages) and the continuous-batching scheduler (jtgpt.serve.scheduler); the paged
attention kernel is jtgpt.kernels.attention.paged."""
from jtgpt.serve.pages import OutOfPages, PageAllocator
from jtgpt.serve.scheduler import Entry, Request, Scheduler

__all__ = ["Entry", "OutOfPages", "PageAllocator", "Request", "Scheduler"]
