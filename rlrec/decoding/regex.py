"""A regular expression that matches exactly the catalogue's identifier strings, for vLLM structured outputs
(`vllm_structured_outputs_regex` in TRL's GRPO config). No rlrec path uses it yet (there is no vLLM rollout); it
is kept, tested, for that one.

Built from a character trie so that shared prefixes are written once: `(?:<a_1>(?:<b_2>|<b_3>))` instead of an
alternation of every full identifier, which keeps the pattern small for a 4,344-item catalogue.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def identifier_regex(identifiers: Iterable[str]) -> str:
    root: dict = {}
    end = object()
    for text in identifiers:
        node = root
        for char in text:
            node = node.setdefault(char, {})
        node[end] = True

    def emit(node: dict) -> str:
        prefix = ""
        while end not in node and len(node) == 1:  # a chain without branches: no group needed
            ((char, node),) = node.items()
            prefix += re.escape(char)
        branches = [re.escape(c) + emit(child) for c, child in sorted((c, n) for c, n in node.items() if c is not end)]
        if not branches:
            return prefix
        if len(branches) == 1 and end not in node:
            return prefix + branches[0]
        body = "(?:" + "|".join(branches) + ")"
        return prefix + (body + "?" if end in node else body)

    return emit(root)
