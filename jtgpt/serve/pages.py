"""The page allocator of the paged KV cache: which pages of the pool are free, who holds each page,
and the prefix cache that lets requests with a common prompt prefix share its pages.

The pool holds `num_pages` pages of `page_size` token slots each (the device arrays live elsewhere:
this module is host bookkeeping only). A sequence's keys and values sit in the pages of its block
table, in order: token t in page table[t // page_size], slot t % page_size.

Reference counts. Every page a live sequence holds counts one reference per holder; a page with
no reference is free. A free page is either blank (on the free list) or cached: full of the tokens
of some earlier prompt, kept in the prefix cache so that a later request with the same prefix can
take it back instead of recomputing it. Cached free pages count as free (`num_free_pages`) and are
reclaimed, least recently released first, when blank pages run out.

Prefix cache. Only full pages are cached. Page i of a sequence is keyed by

    key_i = (key_{i-1}, tokens[i P : (i + 1) P], namespace)     (key_{-1} = None)

the whole prefix up to the page's end (P = page_size; namespace tells models and dtypes apart: two
pages are interchangeable only if the same model computed them in the same dtype). The dictionary
compares keys for equality, not only by hash, so a hash collision can never hand out a page that
holds other tokens. A key (PageKey) holds its parent key object and its hash, computed once from
the parent's: making, hashing and comparing a key along a chain costs O(P), however long the
prefix (a nested tuple would re-hash its whole chain on every lookup: O(prefix) a page).
"""
from __future__ import annotations

import collections
from typing import Hashable, Sequence


class PageKey:
    """The prefix-cache key of a full page: its tokens after the parent key's prefix (None: the
    sequence's first page), in a namespace (module docstring). Equal keys hold equal prefixes."""
    __slots__ = ("parent", "tokens", "namespace", "_hash")

    def __init__(self, parent: PageKey | None, tokens: tuple[int, ...], namespace: Hashable):
        self.parent, self.tokens, self.namespace = parent, tokens, namespace
        self._hash = hash((hash(namespace) if parent is None else parent._hash, tokens))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        a, b = self, other
        while a is not b:  # down both chains, until they meet at one object (a matched parent)
            if not isinstance(b, PageKey) or a._hash != b._hash or a.tokens != b.tokens:
                return False
            if a.parent is None or b.parent is None:
                return a.parent is b.parent and a.namespace == b.namespace
            a, b = a.parent, b.parent
        return True

    def __repr__(self) -> str:
        return f"PageKey(tokens={self.tokens}, parent={'None' if self.parent is None else '...'})"


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than asked for (the scheduler preempts a sequence then)."""


class PageAllocator:
    """Free list, reference counts and prefix cache of a pool of `num_pages` pages."""

    def __init__(self, num_pages: int, page_size: int):
        if not (isinstance(num_pages, int) and num_pages >= 1):
            raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
        if not (isinstance(page_size, int) and page_size >= 1):
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._refs = [0] * num_pages
        self._blank = collections.deque(range(num_pages))  # free, not in the prefix cache
        # Free pages still in the prefix cache, least recently released first (an ordered set).
        self._cached_free: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._page_of_key: dict[PageKey, int] = {}
        self._key_of_page: dict[int, PageKey] = {}

    # ------------------------------------------------------------------------------ counts

    @property
    def num_free_pages(self) -> int:
        """Pages no live sequence holds: blank ones and cached ones (reclaimable on demand)."""
        return len(self._blank) + len(self._cached_free)

    @property
    def num_cached_pages(self) -> int:
        """Pages in the prefix cache, held or not."""
        return len(self._page_of_key)

    def refs(self, page: int) -> int:
        """How many holders page has (0: free)."""
        return self._refs[self._checked(page)]

    # ------------------------------------------------------------------ allocate and release

    def allocate(self, count: int) -> list[int]:
        """`count` pages, each now held once; blank pages first, then the cached free pages
        released longest ago, which leave the prefix cache. OutOfPages (and nothing allocated)
        when fewer than `count` are free."""
        if not (isinstance(count, int) and count >= 0):
            raise ValueError(f"count must be a non-negative int, got {count!r}")
        if count > self.num_free_pages:
            raise OutOfPages(f"asked for {count} pages, {self.num_free_pages} of "
                             f"{self.num_pages} are free")
        pages = []
        for _ in range(count):
            if self._blank:
                page = self._blank.popleft()
            else:
                page, _ = self._cached_free.popitem(last=False)
                del self._page_of_key[self._key_of_page.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def share(self, pages: Sequence[int]) -> None:
        """One more holder for each of pages (held already: e.g. a forked sequence)."""
        for page in pages:
            if self._refs[self._checked(page)] == 0:
                raise ValueError(f"page {page} is free: only a held page can be shared")
        for page in pages:
            self._refs[page] += 1

    def release(self, pages: Sequence[int]) -> None:
        """One holder fewer for each of pages (a block table, in order); a page left with none is
        free again (cached if it is in the prefix cache, else blank). The table's last pages count
        as released first, so that reclaiming takes a prefix's tail before its head, which more
        prompts share. Releasing a free page is a ValueError."""
        for page in pages:
            if self._refs[self._checked(page)] == 0:
                raise ValueError(f"page {page} is already free")
        if len(set(pages)) != len(pages):
            raise ValueError(f"pages must not repeat, got {list(pages)}")
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of_page:
                    self._cached_free[page] = None
                else:
                    self._blank.append(page)

    # ------------------------------------------------------------------------ prefix cache

    def page_keys(self, tokens: Sequence[int], namespace: Hashable = None,
                  parent: PageKey | None = None) -> list[PageKey]:
        """The prefix-cache keys of the full pages of `tokens` (module docstring), in order;
        tokens continue the prefix of `parent` (None: they start the sequence)."""
        P = self.page_size
        keys = []
        for start in range(0, len(tokens) - P + 1, P):
            parent = PageKey(parent, tuple(map(int, tokens[start:start + P])), namespace)
            keys.append(parent)
        return keys

    def key_of(self, page: int) -> PageKey | None:
        """The key page is cached under (None: not in the prefix cache)."""
        return self._key_of_page.get(self._checked(page))

    def match_prefix(self, tokens: Sequence[int], namespace: Hashable = None) -> list[int]:
        """The cached pages holding the longest cached prefix of `tokens` in whole pages, each
        now held once more (a cached free page leaves the free pages). The caller computes the
        tokens after them, and at least the last token itself (its logits are needed), so a
        prompt that is all cached pages gets its last page back as not matched."""
        pages, parent = [], None
        P = self.page_size
        for start in range(0, len(tokens) - P, P):  # never the page ending at the last token
            key = PageKey(parent, tuple(map(int, tokens[start:start + P])), namespace)
            page = self._page_of_key.get(key)
            if page is None:
                break
            pages.append(page)
            parent = self._key_of_page[page]  # the stored object: later compares by identity
        for page in pages:
            if self._refs[page] == 0:
                del self._cached_free[page]
            self._refs[page] += 1
        return pages

    def cache_page(self, page: int, key: PageKey) -> int:
        """Offer held page, now full, to the prefix cache under key (from `page_keys`); returns
        the page that holds key in the cache: page itself, or an earlier page with the same
        tokens (then page stays uncached and the caller may keep using either). A page whose
        parent prefix has left the cache is not cached (no match could reach it); page comes
        back."""
        if self._refs[self._checked(page)] == 0:
            raise ValueError(f"page {page} is free: only a held, written page can be cached")
        cached = self._page_of_key.get(key)
        if cached is not None:
            return cached
        if page in self._key_of_page:
            raise ValueError(f"page {page} is cached already, under another key")
        if key.parent is not None and key.parent not in self._page_of_key:
            return page
        self._page_of_key[key] = page
        self._key_of_page[page] = key
        return page

    def _checked(self, page) -> int:
        if not (isinstance(page, int) and 0 <= page < self.num_pages):
            raise ValueError(f"page must be an int in [0, {self.num_pages}), got {page!r}")
        return page
