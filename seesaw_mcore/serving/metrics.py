"""``/metrics``: the engine's load and counters in Prometheus' text format
(``prometheus_client``), named like vLLM's with a ``seesaw:`` prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from seesaw_mcore.engine.load import EngineLoad, RequestCounters


class _Snapshot:
    """A collector over one ``EngineLoad`` and the request counters."""

    def __init__(self, load: EngineLoad | None, counts: RequestCounters, model: str) -> None:
        self.load, self.counts, self.model = load, counts, model

    def collect(self):
        label = ["model_name"]

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(f"seesaw:{name}", doc, labels=label)
            g.add_metric([self.model], value)
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(f"seesaw:{name}", doc, labels=label)
            c.add_metric([self.model], value)
            return c

        c = self.counts
        yield counter("prompt_tokens", "Prompt tokens of finished requests.", c.prompt_tokens)
        yield counter("generation_tokens", "Generated tokens of finished requests.",
                      c.generation_tokens)
        yield counter("request_success", "Requests finished (aborted ones included).",
                      c.requests)
        yield counter("request_aborted", "Requests aborted.", c.aborted)
        ld = self.load
        if ld is None:  # the engine has failed: its counters only
            return
        yield gauge("num_requests_running", "Sequences on the device or in a KV tier.",
                    ld.running)
        yield gauge("num_requests_waiting", "Sequences waiting for prefill or queued.",
                    ld.waiting)
        yield gauge("num_requests", "Requests in flight or queued.", ld.requests)
        yield gauge("kv_cache_usage_perc", "Share of device KV blocks in use (0..1).",
                    ld.kv_usage)
        if ld.tier_usage is not None:
            yield gauge("kv_tier_usage_perc", "The host/disk KV tiers' load (0..1).",
                        ld.tier_usage)
        yield counter("prefix_cache_queries", "Prefill tokens looked up in the prefix cache.",
                      ld.prefix_queried)
        yield counter("prefix_cache_hits", "Prefill tokens found in the prefix cache.",
                      ld.prefix_hit)
        yield gauge("prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries.",
                    ld.prefix_hit / ld.prefix_queried if ld.prefix_queried else 0.0)
        yield counter("phase_switches", "Seesaw phase switches (re-shardings).", ld.switches)
        yield counter("num_preemptions", "Preemptions (recompute or swap).", ld.preemptions)
        phase = GaugeMetricFamily("seesaw:phase", "1 for the phase the ranks are in.",
                                  labels=[*label, "phase"])
        for name in ("prefill", "decode"):
            phase.add_metric([self.model, name], float(ld.phase == name))
        yield phase
        yield gauge("engine_paused", "1 while generation is paused.", float(ld.paused))
        yield gauge("engine_sleeping", "1 while the engine's memory is released.",
                    float(ld.asleep))


def metrics_text(load: EngineLoad | None, counts: RequestCounters, model: str) -> bytes:
    """The exposition text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(load, counts, model))
    return generate_latest(registry)
