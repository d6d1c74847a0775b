"""Minimum s-t cut over a small hypergraph: where the Casts go.

The precision assignment is a two-label problem: every *precision variable* (a node, or
one carried value of a control-flow node) is either low (fp16/bf16, the source side)
or high (fp32, the sink side). A value whose producer and consumers disagree costs one
Cast, however many consumers sit on the other side, so each value is a *hyperedge*
over its producer and consumers with a weight paid once when it is cut. Lawler's
construction turns a hyperedge into two auxiliary vertices joined by an arc of that
weight (members -> in: inf, in -> out: w, out -> members: inf), and a max-flow
(Dinic, integer capacities) gives an exact minimum: the fewest (then smallest) Casts for
the fixed choices, not a greedy local fix-up.
"""

from __future__ import annotations

__all__ = ["INF", "Cut"]

from collections import deque

INF = 1 << 62


class Cut:
    """Variables ``0..n-1``; :meth:`solve` returns the set of variables on the low side."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.source = n
        self.sink = n + 1
        self._size = n + 2
        self._head: list[list[int]] = [[] for _ in range(self._size)]
        self._to: list[int] = []
        self._cap: list[int] = []

    def _vertex(self) -> int:
        self._head.append([])
        self._size += 1
        return self._size - 1

    def _arc(self, a: int, b: int, cap: int) -> None:
        self._head[a].append(len(self._to))
        self._to.append(b)
        self._cap.append(cap)
        self._head[b].append(len(self._to))
        self._to.append(a)
        self._cap.append(0)

    def force_low(self, v: int) -> None:
        self._arc(self.source, v, INF)

    def force_high(self, v: int) -> None:
        self._arc(v, self.sink, INF)

    def prefer_low(self, v: int, weight: int) -> None:
        """Keeping ``v`` high costs ``weight``."""
        if weight > 0:
            self._arc(self.source, v, weight)

    def hyperedge(self, members: set[int] | list[int], weight: int) -> None:
        """Pay ``weight`` once when ``members`` end up on both sides."""
        members = sorted(set(members))
        if len(members) < 2 or weight <= 0:
            return
        if len(members) == 2:
            a, b = members
            self._arc(a, b, weight)
            self._arc(b, a, weight)
            return
        e_in, e_out = self._vertex(), self._vertex()
        for m in members:
            self._arc(m, e_in, INF)
            self._arc(e_out, m, INF)
        self._arc(e_in, e_out, weight)

    def _augment(self, level: list[int], it: list[int]) -> int:
        """One augmenting path in the level graph (iterative: graphs can be deep)."""
        s, t = self.source, self.sink
        to, cap, head = self._to, self._cap, self._head
        path: list[int] = []
        a = s
        while True:
            if a == t:
                got = min(cap[e] for e in path)
                for e in path:
                    cap[e] -= got
                    cap[e ^ 1] += got
                return got
            edges = head[a]
            while it[a] < len(edges):
                e = edges[it[a]]
                if cap[e] > 0 and level[to[e]] == level[a] + 1:
                    break
                it[a] += 1
            if it[a] < len(edges):
                path.append(edges[it[a]])
                a = to[edges[it[a]]]
                continue
            if a == s:
                return 0
            level[a] = -1  # a dead end for this phase
            e = path.pop()
            a = to[e ^ 1]
            it[a] += 1

    def solve(self) -> tuple[set[int], int]:
        """(variables on the low side, cut weight). Dinic's algorithm."""
        flow = 0
        s, t = self.source, self.sink
        to, cap, head = self._to, self._cap, self._head
        while True:
            level = [-1] * self._size
            level[s] = 0
            queue = deque([s])
            while queue:
                a = queue.popleft()
                for e in head[a]:
                    if cap[e] > 0 and level[to[e]] < 0:
                        level[to[e]] = level[a] + 1
                        queue.append(to[e])
            if level[t] < 0:
                break
            it = [0] * self._size
            while True:
                got = self._augment(level, it)
                if not got:
                    break
                flow += got
        # Low side: reachable from the source in the residual graph.
        seen = [False] * self._size
        seen[s] = True
        queue = deque([s])
        while queue:
            a = queue.popleft()
            for e in head[a]:
                if cap[e] > 0 and not seen[to[e]]:
                    seen[to[e]] = True
                    queue.append(to[e])
        return {v for v in range(self.n) if seen[v]}, flow
