"""KV block bookkeeping: a free list, reference counts and the prefix cache.

A block holds `block_size` consecutive tokens of one sequence. A *full* block can be shared: it
is keyed by the hash chain of its tokens (the hash of its own tokens and of the block before it),
so two requests whose prompts start with the same tokens map their first blocks to the same
cache memory. Blocks are reference-counted; a shared block whose count drops to zero keeps its
contents and its key and waits in an LRU list, from which it is either revived by a later hit or
taken for new data when the free list runs dry (least recently released first).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from lmc.errors import LmcError

ROOT_HASH = b""


def chain_hash(parent: bytes, tokens: list[int], extra: bytes = b"") -> bytes:
    """Key of a full block: its tokens, the key of the block before it (ROOT_HASH for the first) and `extra`, the
    content digests of the images whose tokens the block holds (image tokens are all the same id)."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes() + extra, digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # refcount 0, no key
        self.evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0, keyed; oldest first
        self.key_of: dict[int, bytes] = {}  # block -> key, for keyed blocks
        self.block_of: dict[bytes, int] = {}  # key -> block
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of those, tokens found

    # ------------------------------------------------------------------ capacity
    @property
    def num_free(self) -> int:
        """Blocks that an allocation can take now (free or evictable)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reserve(self, n: int) -> list[int]:
        """Take n blocks out of circulation for good (the CUDA-graph decoder's scratch block)."""
        blocks = self.allocate(n)
        self.num_blocks -= n
        return blocks

    # ------------------------------------------------------------------ allocate / release
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise LmcError(f"KV cache out of blocks: need {n}, {self.num_free} free of {self.num_blocks}")
        out = []
        for _ in range(n):
            if self.free:
                block = self.free.popleft()
            else:
                block, _ = self.evictable.popitem(last=False)
                del self.block_of[self.key_of.pop(block)]
            self.ref[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Released tail-first, so a sequence's later blocks are
        evicted before its earlier ones (an early block is a prefix of more prompts)."""
        for block in reversed(blocks):
            assert self.ref[block] > 0, f"block {block} released more often than taken"
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    # ------------------------------------------------------------------ prefix cache
    def match(self, keys: list[bytes]) -> list[int]:
        """Take a reference to the cached blocks of the longest prefix of `keys` (block keys in order)."""
        if not self.prefix_caching:
            return []
        out = []
        for key in keys:
            block = self.block_of.get(key)
            if block is None:
                break
            if self.ref[block] == 0:
                del self.evictable[block]
            self.ref[block] += 1
            out.append(block)
        return out

    def record_lookup(self, tokens: int, hits: int) -> None:
        self.queried_tokens += tokens
        self.hit_tokens += hits

    def register(self, block: int, key: bytes) -> None:
        """Make a full block findable by its key (a no-op when another block already holds that key)."""
        if self.prefix_caching and key not in self.block_of and block not in self.key_of:
            self.block_of[key] = block
            self.key_of[block] = key

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
