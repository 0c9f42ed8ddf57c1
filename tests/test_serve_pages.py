"""The paged KV cache's page allocator (jtgpt.serve.pages): free pages, reference counts, the
prefix cache's matching, sharing and reclaiming, and that every page comes back."""
import random

import pytest

from jtgpt.serve import OutOfPages, PageAllocator

P = 4  # page size


def cached_sequence(pool, tokens, namespace=None):
    """A sequence of `tokens` as the engine would run it: the pages its prefix cache gives it,
    new pages for the rest, and every full page offered to the cache. Returns its block table."""
    table = pool.match_prefix(tokens, namespace)
    try:
        table += pool.allocate(-(-len(tokens) // P) - len(table))
    except OutOfPages:
        pool.release(table)
        raise
    for page, key in zip(table, pool.page_keys(tokens, namespace)):
        pool.cache_page(page, key)
    return table


def test_allocate_and_release_count_every_page():
    pool = PageAllocator(num_pages=10, page_size=P)
    a, b = pool.allocate(3), pool.allocate(7)
    assert sorted(a + b) == list(range(10)) and pool.num_free_pages == 0
    with pytest.raises(OutOfPages, match="asked for 1 pages, 0 of 10"):
        pool.allocate(1)
    pool.share(a[:1])
    pool.release(a)
    assert pool.refs(a[0]) == 1 and pool.num_free_pages == 2
    pool.release(a[:1] + b)
    assert pool.num_free_pages == 10 and all(pool.refs(p) == 0 for p in range(10))


def test_out_of_pages_allocates_nothing():
    pool = PageAllocator(num_pages=4, page_size=P)
    held = pool.allocate(3)
    with pytest.raises(OutOfPages):
        pool.allocate(2)
    assert pool.num_free_pages == 1
    pool.release(held)
    assert pool.num_free_pages == 4


@pytest.mark.parametrize("call,match", [
    (lambda pool: pool.release([0]), "already free"),
    (lambda pool: pool.share([0]), "is free"),
    (lambda pool: pool.release([5]), r"page must be an int in \[0, 5\)"),
    (lambda pool: pool.allocate(-1), "count must be"),
    (lambda pool: pool.cache_page(0, (None, (1, 2, 3, 4), None)), "is free"),
])
def test_misuse_is_refused(call, match):
    pool = PageAllocator(num_pages=5, page_size=P)
    with pytest.raises(ValueError, match=match):
        call(pool)
    assert pool.num_free_pages == 5


@pytest.mark.parametrize("num_pages,page_size", [(0, 16), (8, 0), (8.0, 16)])
def test_bad_pool_sizes(num_pages, page_size):
    with pytest.raises(ValueError, match="must be a positive int"):
        PageAllocator(num_pages, page_size)


def test_a_common_prefix_shares_its_pages():
    """Two prompts of 14 tokens agreeing on the first 9: the second gets the first two pages (8
    tokens) of the first, held twice; the third page differs at token 10, so it is new."""
    pool = PageAllocator(num_pages=16, page_size=P)
    first = list(range(100, 114))
    second = first[:9] + [7, 7, 7, 7, 7]
    table_1 = cached_sequence(pool, first)
    assert pool.num_cached_pages == 3  # 14 tokens: 3 full pages and a partial one
    table_2 = cached_sequence(pool, second)
    assert table_2[:2] == table_1[:2] and set(table_2[2:]).isdisjoint(table_1)
    assert [pool.refs(p) for p in table_1[:2]] == [2, 2]
    pool.release(table_1)
    pool.release(table_2)
    assert pool.num_free_pages == 16


def test_the_last_token_is_always_computed():
    """A prompt made of 3 whole cached pages matches only 2: its last token's logits are needed,
    so its last page is computed again."""
    pool = PageAllocator(num_pages=8, page_size=P)
    tokens = list(range(12))
    pool.release(cached_sequence(pool, tokens))
    assert len(pool.match_prefix(tokens)) == 2
    assert len(pool.match_prefix(tokens + [99])) == 3


def test_namespaces_do_not_mix():
    """Pages computed by another model or dtype never match."""
    pool = PageAllocator(num_pages=8, page_size=P)
    tokens = list(range(9))
    pool.release(cached_sequence(pool, tokens, namespace=("gpt2", "bfloat16")))
    assert pool.match_prefix(tokens, namespace=("gpt2", "float32")) == []
    assert len(pool.match_prefix(tokens, namespace=("gpt2", "bfloat16"))) == 2


class Colliding:
    """A namespace whose hash collides with every other one's."""

    def __init__(self, name):
        self.name = name

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, Colliding) and other.name == self.name


def test_hash_collisions_never_hand_out_other_tokens():
    pool = PageAllocator(num_pages=8, page_size=P)
    a, b = Colliding("a"), Colliding("b")
    table_a = cached_sequence(pool, [1, 2, 3, 4, 5], a)
    table_b = cached_sequence(pool, [1, 2, 3, 4, 5], b)
    assert table_a[0] != table_b[0] and pool.num_cached_pages == 2
    assert pool.match_prefix([1, 2, 3, 4, 5], a) == table_a[:1]
    assert pool.match_prefix([1, 2, 3, 4, 5], b) == table_b[:1]
    assert pool.match_prefix([1, 2, 3, 9, 5], a) == []


def test_cached_free_pages_are_free_and_reclaimed_tail_first():
    """Released cached pages count as free; when blank pages run out, allocation takes the
    cached pages released longest ago, and a prefix's tail before its head."""
    pool = PageAllocator(num_pages=4, page_size=P)
    tokens = list(range(13))  # 3 full pages + 1 partial: the whole pool
    table = cached_sequence(pool, tokens)
    pool.release(table)
    assert pool.num_free_pages == 4 and pool.num_cached_pages == 3
    (page,) = pool.allocate(1)  # the blank (partial) page first
    assert page == table[3] and pool.num_cached_pages == 3
    (page,) = pool.allocate(1)  # then the cached tail
    assert page == table[2] and pool.num_cached_pages == 2
    assert pool.match_prefix(tokens) == table[:2]  # the head still matches


def test_a_duplicate_page_stays_uncached():
    """Two sequences computing the same prefix at once: the second page offered under a key
    already cached stays out of the cache and goes back to blank when released."""
    pool = PageAllocator(num_pages=4, page_size=P)
    first, second = pool.allocate(1), pool.allocate(1)
    key = pool.page_keys([5, 6, 7, 8])[0]
    assert pool.cache_page(first[0], key) == first[0]
    assert pool.cache_page(second[0], key) == first[0]
    pool.release(second)
    pool.release(first)
    assert pool.num_cached_pages == 1 and pool.num_free_pages == 4


def test_page_keys_are_whole_prefixes_built_at_once_or_page_by_page():
    pool = PageAllocator(num_pages=4, page_size=P)
    tokens = [random.Random(1).randrange(100) for _ in range(4000 * P)]  # a long chain
    keys = pool.page_keys(tokens, "ns")
    again = pool.page_keys(tokens[:2000 * P], "ns")
    again += pool.page_keys(tokens[2000 * P:], "ns", parent=again[-1])
    assert keys == again and hash(keys[-1]) == hash(again[-1])  # no recursion, however long
    assert keys[-1] != pool.page_keys([101] + tokens[1:], "ns")[-1]  # the first token differs
    assert keys[-1] != pool.page_keys(tokens, "other")[-1]
    assert keys[1] != keys[0] and keys[0] != tokens[:P]


def test_random_traffic_returns_every_page():
    """Random prompts with common prefixes, sequences finishing in random order, pages running
    out: reference counts never go negative, no page is held twice by one sequence, and when all
    sequences are done every page is free."""
    rng = random.Random(0)
    pool = PageAllocator(num_pages=40, page_size=P)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 20))] for _ in range(4)]
    live = []
    for _ in range(300):
        if live and (rng.random() < 0.4 or pool.num_free_pages < 8):
            pool.release(live.pop(rng.randrange(len(live))))
            continue
        tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
        try:
            table = cached_sequence(pool, tokens)
        except OutOfPages:
            continue
        assert len(set(table)) == len(table)
        live.append(table)
        assert sum(pool.refs(p) for p in range(40)) == sum(len(t) for t in live)
    for table in live:
        pool.release(table)
    assert pool.num_free_pages == 40
