"""Prometheus metrics for the central service: ``GET /metrics``.

* ``qrpark_decisions_total{kind,action,reason}`` — commands and acks sent, by outcome;
* ``qrpark_events_replayed_total`` — redelivered events answered from the stored reply;
* ``qrpark_scan_to_decision_seconds`` — from the gateway's scan time to the committed
  decision (spans the gateway's and the service's clocks: keep them NTP-synchronised);
* ``qrpark_batch_size`` — events per group-commit transaction;
* ``qrpark_mqtt_rejected_total{reason}`` — payloads dropped at the edge (bad topic, not
  JSON, unknown version …);
* ``qrpark_event_seq_gaps_total``, ``qrpark_gateway_events_missing{lot,gate}`` — events
  that arrived with earlier ones of the gateway's sequence missing, and how many are still
  missing; ``qrpark_event_conflicts_total`` — races lost to another service process;
* ``qrpark_gateways{state}``, ``qrpark_gateway_outbox_depth{lot,gate}``,
  ``qrpark_dead_letters``, ``qrpark_lot_occupancy{lot}`` — read from the database at scrape.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator, Sequence

import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from parking_protocol.messages import EventAck, GateCommand, ScanEvent
from server.central import Central
from server.mqtt.bridge import Inbound
from server.sessions.flows import Reply

__all__ = ["CONTENT_TYPE", "Metrics", "install_metrics"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 3, 10)


class _StateCollector(Collector):
    """Gauges read from the database and the bridge's counters at scrape time."""

    def __init__(self, central: Central) -> None:
        self._central = central

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._central.stats
        rejected = CounterMetricFamily(
            "qrpark_mqtt_rejected", "Payloads dropped at the MQTT edge", labels=["reason"]
        )
        rejected.add_metric(["bad_topic"], stats.bad_topics)
        for failure, count in stats.decode_failures.items():
            rejected.add_metric([failure.value], count)
        yield rejected
        replayed = CounterMetricFamily(
            "qrpark_events_replayed", "Redelivered events answered from the stored reply"
        )
        replayed.add_metric([], stats.replays)
        yield replayed
        gaps = CounterMetricFamily(
            "qrpark_event_seq_gaps",
            "Times a gateway's event arrived with earlier events of its sequence missing",
        )
        gaps.add_metric([], stats.seq_gaps)
        yield gaps
        missing = GaugeMetricFamily(
            "qrpark_gateway_events_missing",
            "Events of a gateway's sequence not received yet (its outbox replays them)",
            labels=["lot", "gate"],
        )
        if self._central.bridge is not None:
            for (lot, gate), seqs in self._central.bridge.sequences.missing().items():
                missing.add_metric([lot, gate], len(seqs))
        yield missing
        conflicts = CounterMetricFamily(
            "qrpark_event_conflicts",
            "Events that lost a race with another service process and were handled again",
        )
        conflicts.add_metric([], stats.conflicts)
        yield conflicts
        paths = CounterMetricFamily(
            "qrpark_events_decided",
            "Scan events decided, by path: batched statements (fast) or the ORM flow (orm)",
            labels=["path"],
        )
        paths.add_metric(["fast"], stats.fast)
        paths.add_metric(["orm"], stats.events - stats.fast)
        yield paths
        fallbacks = CounterMetricFamily(
            "qrpark_fast_path_fallbacks",
            "Fast-path runs that failed as a whole (a race, a deadlock, a bug) and were decided"
            " by the ORM flow instead",
        )
        fallbacks.add_metric([], stats.fast_fallbacks)
        yield fallbacks
        gateways = GaugeMetricFamily("qrpark_gateways", "Gateways by state", labels=["state"])
        outbox = GaugeMetricFamily(
            "qrpark_gateway_outbox_depth",
            "Events a gateway has not had acknowledged",
            labels=["lot", "gate"],
        )
        occupancy = GaugeMetricFamily(
            "qrpark_lot_occupancy", "Open parking sessions per lot", labels=["lot"]
        )
        dead = GaugeMetricFamily(
            "qrpark_dead_letters", "Events the service could not process, not yet resolved"
        )
        try:
            with self._central.engine.connect() as conn:
                for state, count in conn.execute(
                    sa.text("select state, count(*) from gateway_status group by state")
                ):
                    gateways.add_metric([str(state)], int(count))
                for lot, gate, depth in conn.execute(
                    sa.text("select lot_id, gate_id, queue_depth from gateway_status")
                ):
                    outbox.add_metric([str(lot), str(gate)], int(depth))
                for lot, count in conn.execute(
                    sa.text(
                        "select lot_id, count(*) from parking_sessions where state = 'open' "
                        "group by lot_id"
                    )
                ):
                    occupancy.add_metric([str(lot)], int(count))
                dead.add_metric(
                    [],
                    int(
                        conn.execute(
                            sa.text("select count(*) from dead_letters where resolved_at is null")
                        ).scalar_one()
                    ),
                )
        except sa.exc.SQLAlchemyError as exc:  # a scrape must not fail because the DB did
            log.warning("metrics: database unavailable: %s", exc)
        yield from (gateways, outbox, occupancy, dead)


class Metrics:
    """The service's metrics registry, fed by the bridge after every committed batch."""

    def __init__(self, central: Central) -> None:
        self.central = central
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "qrpark_decisions",
            "Decisions sent to gates",
            ["kind", "action", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "qrpark_scan_to_decision_seconds",
            "Gateway scan time to committed decision",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "qrpark_batch_size",
            "Events per group-commit transaction",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=self.registry,
        )
        self.registry.register(_StateCollector(central))
        central.batch_listeners.append(self.on_batch)

    def on_batch(self, batch: Sequence[Inbound], replies: Sequence[Reply]) -> None:
        now = self.central.clock.now()
        events = [item.message for item in batch if isinstance(item.message, ScanEvent)]
        if events:
            self.batch_size.observe(len(events))
        for event in events:
            if event.offline is None:
                self.latency.observe(max(0.0, (now - event.scanned_at).total_seconds()))
        counted: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for reply in replies:
            message = reply.message
            if isinstance(message, GateCommand):
                counted["command", message.action.value, message.reason.value] += 1
            elif isinstance(message, EventAck):
                counted["ack", "none", message.result.value] += 1
        for labels, count in counted.items():  # one labelled child per kind, not per reply
            self.decisions.labels(*labels).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


router = APIRouter(tags=["system"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    found: Metrics | None = getattr(request.app.state, "metrics", None)
    if found is None:
        return Response("metrics not ready\n", status_code=503, media_type="text/plain")
    return Response(found.render(), media_type=CONTENT_TYPE)


def install_metrics(app: FastAPI, central: Central) -> Metrics:
    """Create the registry for a started service and expose ``/metrics``."""
    found = Metrics(central)
    app.state.metrics = found
    return found
