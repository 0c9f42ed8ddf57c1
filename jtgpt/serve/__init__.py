"""Serving, in separate rooms: the page allocator and prefix cache (jtgpt.serve.pages), the
continuous-batching scheduler (jtgpt.serve.scheduler), the device-side paged KV cache
(jtgpt.serve.paged_cache; its kernel is jtgpt.kernels.attention.paged) and the engine that runs
the model on the scheduler's batches (jtgpt.serve.engine)."""
from jtgpt.serve.engine import Engine
from jtgpt.serve.pages import OutOfPages, PageAllocator
from jtgpt.serve.scheduler import Entry, Request, Scheduler

__all__ = ["Engine", "Entry", "OutOfPages", "PageAllocator", "Request", "Scheduler"]
