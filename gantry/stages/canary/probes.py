"""Requests the canary sends itself, through the router, to one slot at a time.

* Quality probes: the same eval-set items to candidate and champion, scored with the
  evaluate stage's metric, so a model that answers 200 with wrong answers is caught.
* Synthetic traffic: when live traffic is too thin to judge a window, small requests to
  both slots alike, so latencies are compared on equal terms and success rates have
  data. The router logs them like any request; the analysis reads them from there.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from gantry import scoring as ev
from gantry.adapters.haproxy import Slot
from gantry.errors import EndpointResponseError, EndpointUnavailableError
from gantry.spec import Protocol, ReleaseSpec
from gantry.stages.canary.analysis import Quality
from gantry.tls import tls_context

log = logging.getLogger(__name__)

_FALLBACK_TEXTS = (
    "A man is playing a guitar on stage.",
    "The central bank raised interest rates again this quarter.",
)


def sample(items: Sequence[ev.RetrievalItem] | Sequence[ev.ChatItem], n: int) -> list[int]:
    """``n`` indices spread evenly over the set (deterministic: both slots, every step and
    every run see the same items)."""
    total = len(items)
    if n >= total:
        return list(range(total))
    return [round(i * (total - 1) / max(n - 1, 1)) for i in range(n)]


class Prober:
    """Quality and synthetic probes of one release's protocol against a router."""

    def __init__(
        self,
        spec: ReleaseSpec,
        endpoint: str,
        dataset: Path | None,
        headers: Callable[[Slot, str], dict[str, str]],
    ) -> None:
        self.spec, self.endpoint = spec, endpoint.rstrip("/")
        self._headers = headers
        self.model = spec.runtime.served_model_name or spec.name
        self.chat = spec.runtime.protocol is Protocol.OPENAI_CHAT
        self.timeout_s = spec.evaluate.timeout_s
        self._retrieval: list[ev.RetrievalItem] = []
        self._chat: list[ev.ChatItem] = []
        if dataset is not None:
            if self.chat:
                self._chat = ev.load_chat_set(dataset)
            else:
                self._retrieval = ev.load_retrieval_set(dataset)
        texts = [i.prompt for i in self._chat] or [i.query for i in self._retrieval]
        self._texts = itertools.cycle(texts or _FALLBACK_TEXTS)
        self._http = httpx.Client(
            base_url=self.endpoint, timeout=self.timeout_s, trust_env=False, verify=tls_context()
        )

    def close(self) -> None:
        self._http.close()

    @property
    def has_quality_set(self) -> bool:
        return bool(self._retrieval or self._chat)

    # --- quality -------------------------------------------------------------------------

    def _score(self, slot: Slot, n: int) -> float:
        cfg = ev.RunnerConfig(
            model=self.model,
            concurrency=2,
            timeout_s=self.timeout_s,
            attempts=2,
            backoff_s=0.2,
            headers=self._headers(slot, "quality"),
            max_tokens=self.spec.evaluate.max_tokens,
        )
        metric = self.spec.evaluate.metric
        if self.chat:
            items = [self._chat[i] for i in sample(self._chat, n)]
            mode: ev.MatchMode = metric if metric in ("exact", "contains", "regex") else "contains"
            out = ev.run_sync(ev.run_chat(self.endpoint, items, cfg, mode))
            return out.scores["accuracy"]
        ritems = [self._retrieval[i] for i in sample(self._retrieval, n)]
        out = ev.run_sync(ev.run_embeddings(self.endpoint, ritems, cfg))
        return out.scores[metric if metric in out.scores else "top1"]

    def quality(self, candidate: Slot, champion: Slot, n: int) -> Quality | None:
        """Both slots' scores on the same ``n`` items; None without an eval set. A champion
        that cannot be scored leaves ``champion`` None (the check is inconclusive, never a
        pass); a candidate that cannot be scored gets 0: it failed its own eval items."""
        if n <= 0 or not self.has_quality_set:
            return None
        # Both versions at once: the same items, the same moment, half the wait.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="quality") as pool:
            base_f = pool.submit(self._score, champion, n)
            score_f = pool.submit(self._score, candidate, n)
            base: float | None
            try:
                base = base_f.result()
            except (EndpointUnavailableError, EndpointResponseError) as exc:
                log.warning("quality probe of the champion failed: inconclusive: %s", exc)
                base = None
            try:
                score = score_f.result()
            except (EndpointUnavailableError, EndpointResponseError) as exc:
                log.warning("quality probe of the candidate failed: %s", exc)
                score = 0.0
        items = min(n, len(self._chat) or len(self._retrieval))
        return Quality(
            metric="accuracy" if self.chat else self.spec.evaluate.metric,
            items=items,
            candidate=score,
            champion=base,
        )

    # --- synthetic traffic -----------------------------------------------------------------

    def synthetic(self, slot: Slot) -> bool:
        """One small request to ``slot``; whether it succeeded (the router logs it too)."""
        text = next(self._texts)
        headers = self._headers(slot, "synthetic")
        try:
            if self.chat:
                # Streamed, as chat clients ask: the servers' time-to-first-token histograms
                # (the ttft-p95 check) only see streamed answers.
                with self._http.stream(
                    "POST",
                    "/v1/chat/completions",
                    headers=headers,
                    json={
                        "model": self.model,
                        "messages": [{"role": "user", "content": text}],
                        "max_tokens": 8,
                        "temperature": 0,
                        "stream": True,
                    },
                ) as r:
                    for _ in r.iter_bytes():
                        pass
            else:
                r = self._http.post(
                    "/v1/embeddings", headers=headers, json={"model": self.model, "input": [text]}
                )
        except httpx.HTTPError as exc:
            log.debug("synthetic probe to slot %s failed: %s", slot.value, exc)
            return False
        return r.status_code < 500
