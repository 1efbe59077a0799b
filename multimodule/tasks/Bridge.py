"""The built-in ``Bridge`` task: queues across hosts through NATS JetStream.

A send with ``destination="HOST"`` (another host) lands on this host's ``Bridge`` queue (see
``multimodule.transit._address``). The Bridge publishes it to the subject
``mm.STREAM.HOST.QNAME`` (host and queue name escaped, see :func:`escape_token`) of one
JetStream stream, with ``Nats-Msg-Id`` derived from the message's id and its subject, and
counts it as sent only once JetStream acknowledges it: until then its handler waits (and
retries, for ever, while the servers are unreachable), so the Bridge's queue fills and its
senders are held back as with any full queue. A message handed to the Bridge again after a
crash is published with the same ``Nats-Msg-Id``, which JetStream drops within the stream's
``duplicate_window_s``.

Inbound, one durable pull consumer per host (filter ``mm.STREAM.HOST.>``, acknowledgement
policy *all*) takes the messages for this host in stream order. Each batch is delivered into
the local queues they name (the message keeps its id, send time and origin, and gains this
host in ``.ipc_transit_meta.route``), the Bridge waits until they are safe from a kill (in the
receiving tasks' journals or System V queues, :meth:`Task.wait_sent`), records the batch's last
stream sequence in ``STATE_DIR/Bridge.inbound-STREAM`` and only then acknowledges it. When it starts
and after every reconnection the consumer is made again from the recorded sequence on (so a
pull subscription never goes silent after a server restart, and nothing delivered is taken
again); a message JetStream delivers again anyway (its sequence is not above the recorded one)
is dropped and counted. Messages for one (source host, queue) therefore arrive once and in the
order they were sent.

Messages larger than the server's ``max_payload`` cross whole through a JetStream object store
(bucket ``mm_STREAM_large``): the message goes there, and a reference is published; the
receiving Bridge reads it back and removes it once delivered. Above ``max_message_bytes``
(default 64 MiB) a message is refused with :class:`~multimodule.errors.MessageTooLarge`,
reported on ``error`` with the message.

Config::

    [Bridge]
    servers = ["nats://10.0.0.5:4222", "nats://10.0.0.6:4222"]
    host = "web1"                 # default: $MULTIMODULE_HOSTNAME or the machine's host name
    stream = "MULTIMODULE"        # one stream for all hosts that talk to each other
    replicas = 3                  # 1, or 3 on a three-node cluster
    ca = "/etc/multimodule/nats-ca.pem"       # TLS: the servers' CA ...
    cert = "/etc/multimodule/nats-client.pem" # ... and a client certificate, if they ask
    key = "/etc/multimodule/nats-client.key"
    credentials = "/etc/multimodule/bridge.creds"   # NATS user credentials (JWT + nkey)

Connection lost: an alert, the client reconnects for ever (a log line and an alert when it is
back), outbound publishes wait. Figures (``mmctl status --json``, Prometheus
``multimodule_bridge_*``): ``bridge_connected``, ``bridge_published``, ``bridge_delivered``,
``bridge_pending_acks``, ``bridge_redeliveries_dropped``, ``bridge_reconnects``, ``bridge_lag``
(messages for this host still in the stream), ``bridge_publish_retries``, ``bridge_refused``,
``bridge_deliveries_missed`` (deliveries that never reached the Bridge, taken again).
Passwords and tokens in server URLs are never logged or reported. See ``docs/bridge.md``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    StringConstraints,
    field_validator,
    model_validator,
)

from multimodule.config import HostName, redact
from multimodule.errors import (
    BadMessage,
    BridgeError,
    MessageTooLarge,
    QueueCreationRefused,
    TransitError,
)
from multimodule.state import open_own_file, write_atomic
from multimodule.task import Task
from multimodule.transit import META_KEY
from multimodule.transit.lowlevel import (
    DESTINATION_KEY,
    DESTINATION_QNAME_KEY,
    decode_body,
    encode_body,
    hostname,
)

#: First token of every subject the Bridge uses.
SUBJECT_ROOT = "mm"
#: Header naming the object-store entry that holds a large message.
OBJECT_HEADER = "Mm-Object"
#: Bytes kept free under ``max_payload`` for headers when deciding what is "large".
HEADER_ROOM = 1024
#: Size of the record of the last stream sequence delivered (a sequence and an escaped host
#: name, at most 3 * 253 characters), written in one ``pwrite``.
RECORD_BYTES = 1024
#: Failures to make or read the stream before an alert (an election takes a few).
STREAM_ALERT_AFTER = 10
#: Seconds between two readings of the consumer's backlog (``bridge_lag``).
LAG_INTERVAL_S = 1.0
#: Seconds between two attempts to reach the servers at start, at most.
MAX_BACKOFF_S = 2.0

StreamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,32}$")]

# Characters left as they are in subject tokens and consumer names; everything else (".",
# "*", ">", whitespace, "%", non-ASCII...) is written %XX per UTF-8 byte.
_SAFE = "-_"


def escape_token(text: str) -> str:
    """``text`` as one NATS subject token (and a valid consumer name): reversible, no ``.``,
    ``*``, ``>``, whitespace or non-ASCII characters (``"a.b c"`` -> ``"a%2Eb%20c"``)."""
    return quote(text, safe=_SAFE).replace(".", "%2E").replace("~", "%7E")


def unescape_token(token: str) -> str:
    """The text :func:`escape_token` made ``token`` from."""
    return unquote(token, errors="strict")


def subject_for(stream: str, host: str, qname: str) -> str:
    """The subject of queue ``qname`` on ``host``: ``mm.STREAM.HOST.QNAME``, escaped."""
    return f"{SUBJECT_ROOT}.{stream}.{escape_token(host)}.{escape_token(qname)}"


def message_id_for(message_id: str, subject: str) -> str:
    """``Nats-Msg-Id`` of a message sent to ``subject``: the same message forwarded to two
    queues makes two ids, the same message published again after a crash the same one."""
    return hashlib.blake2b(f"{message_id}\0{subject}".encode(), digest_size=16).hexdigest()


class Bridge(Task):
    """See the module docstring. Stateful, so that it may run in its own process
    (``is_external = true``); its state shows the last stream sequence delivered here
    (``inbound_seq``), whose record of truth is ``STATE_DIR/Bridge.inbound-STREAM``."""

    is_stateful = True
    #: Where it connects and the credentials it shows there come from the config file only:
    #: a control message pointing ``servers`` elsewhere would have the Bridge sign that
    #: server's challenge with this host's credentials.
    file_only_config = frozenset({"servers", "ca", "cert", "key", "credentials"})

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        servers: list[str] = Field(
            default_factory=lambda: ["nats://127.0.0.1:4222"], min_length=1,
            description="NATS server URLs (nats:// or tls://)")
        host: HostName | None = Field(
            None, description="this host's name for the other hosts (default: "
                              "$MULTIMODULE_HOSTNAME or the machine's host name)")
        stream: StreamName = Field("MULTIMODULE", description="the JetStream stream")
        replicas: Literal[1, 3] = Field(1, description="copies of the stream (3 on a "
                                                       "three-node cluster)")
        ca: FilePath | None = Field(None, description="CA certificate of the servers (PEM)")
        cert: FilePath | None = Field(None, description="client certificate (PEM)")
        key: FilePath | None = Field(None, description="client certificate's key (PEM)")
        credentials: FilePath | None = Field(None,
                                             description="NATS user credentials file")
        max_message_bytes: int = Field(64 << 20, ge=1024, le=1 << 30,
                                       description="largest message carried, bytes")
        batch: int = Field(256, ge=1, le=10_000, description="messages taken per fetch")
        publish_timeout_s: float = Field(5.0, gt=0, le=300,
                                         description="seconds to wait for one publish's ack")
        duplicate_window_s: float = Field(600.0, ge=1, le=86_400,
                                          description="seconds JetStream drops a message "
                                                      "published again with the same id")
        max_age_s: float = Field(7 * 86_400.0, ge=60, le=10 * 366 * 86_400,
                                 description="seconds a message waits in the stream for a "
                                             "host that does not take it")

        @field_validator("servers", mode="before")
        @classmethod
        def _one_or_many(cls, value: Any) -> Any:
            return [value] if isinstance(value, str) else value

        @field_validator("servers")
        @classmethod
        def _urls(cls, value: list[str]) -> list[str]:
            for url in value:
                parts = urlsplit(url)
                try:
                    parts.port  # noqa: B018 - raises ValueError when out of range
                except ValueError as exc:
                    raise ValueError(f"{redact(url)!r}: {exc}") from None
                if parts.scheme not in ("nats", "tls") or not parts.hostname:
                    raise ValueError(f"{redact(url)!r} is not a nats:// or tls:// URL")
            return value

        @field_validator("replicas", mode="before")
        @classmethod
        def _not_a_bool(cls, value: Any) -> Any:
            if isinstance(value, bool):
                raise ValueError("replicas is a number, 1 or 3, not true or false")
            return value

        @model_validator(mode="after")
        def _key_with_cert(self) -> Bridge.Config:
            if (self.key is None) != (self.cert is None):
                raise ValueError("cert and key go together: give both or neither")
            return self

    # -- life cycle --------------------------------------------------------------------------

    def set_config(self, config: dict[str, Any]) -> None:
        settings = self.settings or self.Config()
        if getattr(self, "settings_in_use", None) is None:
            self._init_figures()
        elif settings == self.settings_in_use:
            return
        else:
            self._generation += 1
            # A new config (servers, TLS, host, stream): start again with it.
            self._runner.cancel()
            self.connected.clear()
            if self.nc is not None:
                asyncio.get_running_loop().create_task(self._close(self.nc))
                self.nc = self.js = self.objects = None
            self._close_record()
        self.settings_in_use = settings
        self.host = (settings.host or hostname()).lower()
        self.stream = settings.stream
        self._seq_path = self.private_path(f"inbound-{self.stream}")
        self.delivered_seq = self._read_seq()
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="bridge")

    def _init_figures(self) -> None:
        self.nc: Any = None
        self.js: Any = None
        self.objects: Any = None
        self.connected = asyncio.Event()
        #: Changes with every new config and at the stop (see :meth:`_run`).
        self._generation = 0
        self._unreachable = False
        self._seq_fd: int | None = None
        self.published = self.delivered = self.pending_acks = 0
        self.redeliveries_dropped = self.reconnects = self.publish_retries = 0
        self.refused = 0
        self.deliveries_missed = 0
        self.publish_duplicates = 0
        self._consumer_seq = 0
        self.lag = 0
        self._resubscribe = asyncio.Event()

    def stopping(self) -> None:
        # No more inbound messages (a batch being delivered finishes: it is shielded); the
        # connection stays for the outbound messages still to be handled.
        runner = getattr(self, "_runner", None)
        if runner is not None:
            self._generation += 1
            runner.cancel()

    def stopped(self) -> None:
        if getattr(self, "nc", None) is not None:
            asyncio.get_running_loop().create_task(self._close(self.nc))
        self._close_record()

    def _close_record(self) -> None:
        if getattr(self, "_seq_fd", None) is not None:
            os.close(self._seq_fd)
            self._seq_fd = None

    @staticmethod
    async def _close(nc: Any) -> None:
        try:
            await nc.close()
        except Exception:  # noqa: BLE001 - closing a connection that already failed
            pass

    def extra_figures(self) -> dict[str, int]:
        if getattr(self, "settings_in_use", None) is None:
            return {}
        return {"bridge_connected": int(self.connected.is_set()),
                "bridge_published": self.published, "bridge_delivered": self.delivered,
                "bridge_pending_acks": self.pending_acks,
                "bridge_redeliveries_dropped": self.redeliveries_dropped,
                "bridge_reconnects": self.reconnects, "bridge_lag": self.lag,
                "bridge_publish_retries": self.publish_retries,
                "bridge_refused": self.refused,
                "bridge_deliveries_missed": self.deliveries_missed,
                "bridge_publish_duplicates": self.publish_duplicates}

    # -- the connection ----------------------------------------------------------------------

    def _servers_text(self) -> str:
        return ", ".join(redact(url) for url in self.settings_in_use.servers)

    def _connect_options(self, generation: int) -> dict[str, Any]:
        settings = self.settings_in_use

        def current(handler: Any) -> Any:
            # A connection of an earlier generation (a config since replaced, closing in
            # the background) must not touch the state of the current one.
            async def callback(*args: Any) -> None:
                if generation == self._generation:
                    await handler(*args)
            return callback

        options: dict[str, Any] = {
            "servers": settings.servers, "name": f"multimodule-bridge-{self.host}",
            "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5, "connect_timeout": 2,
            # A link that drops packets is noticed within about 15 s (nats-py: 2 minutes).
            "ping_interval": 5, "max_outstanding_pings": 3,
            "allow_reconnect": True, "disconnected_cb": current(self._disconnected),
            "reconnected_cb": current(self._reconnected), "error_cb": current(self._nats_error),
            "closed_cb": current(self._closed),
        }
        if settings.ca or settings.cert or any(u.startswith("tls:") for u in settings.servers):
            context = ssl.create_default_context(
                cafile=str(settings.ca) if settings.ca else None)
            if settings.cert:
                context.load_cert_chain(str(settings.cert), str(settings.key))
            options["tls"] = context
        if settings.credentials:
            options["user_credentials"] = str(settings.credentials)
        return options

    async def _run(self) -> None:
        """Connect (again and again, until connected), set up the stream, then take this
        host's messages until cancelled or superseded (a new config, a stop: the generation
        changes, so a cancellation the client library swallows still ends this loop)."""
        import nats

        generation = self._generation
        delay = 0.1
        while generation == self._generation:
            try:
                # Tries for ever (max_reconnect_attempts -1), each failure through
                # _nats_error, which alerts once.
                nc = await nats.connect(**self._connect_options(generation))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a bad certificate file
                await self._nats_error(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            if generation != self._generation:
                await self._close(nc)
                return
            self.nc = nc
            if self._unreachable:
                self.alert("NATS servers reached again", servers=self._servers_text())
            self._unreachable, delay = False, 0.1
            self.js = nc.jetstream(timeout=self.settings_in_use.publish_timeout_s)
            self.log(f"connected to NATS ({self._servers_text()}) as host {self.host!r}, "
                     f"stream {self.stream!r}")
            try:
                await self._ensure_stream()
                self.connected.set()
                await self._take_inbound()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - start again from a fresh connection
                if generation == self._generation:
                    self.error(f"bridge connection failed: {_describe(exc)}; connecting "
                               "again")
            if generation == self._generation:
                self.connected.clear()
            await self._close(nc)
            await asyncio.sleep(delay)

    async def _ensure_stream(self) -> None:
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        settings = self.settings_in_use
        config = StreamConfig(
            name=self.stream, subjects=[f"{SUBJECT_ROOT}.{self.stream}.>"],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            num_replicas=settings.replicas, duplicate_window=settings.duplicate_window_s,
            max_age=settings.max_age_s)
        failures = 0
        while True:
            try:
                try:
                    await self.js.stream_info(self.stream)
                except NotFoundError:
                    await self.js.add_stream(config)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. no JetStream leader yet
                if not self.nc.is_connected:
                    raise
                failures += 1
                if failures == STREAM_ALERT_AFTER:  # not an election: say why, once
                    self.alert(f"stream {self.stream!r} cannot be made or read: "
                               f"{_describe(exc)}; trying again (replicas = "
                               f"{settings.replicas}: a cluster of at least that many nodes?)")
                else:
                    self.debug(f"stream {self.stream!r} not ready: {_describe(exc)}")
                await asyncio.sleep(min(0.2 * failures, MAX_BACKOFF_S))

    async def _objects(self) -> Any:
        if self.objects is None:
            from nats.js.api import ObjectStoreConfig
            from nats.js.errors import NotFoundError

            bucket = f"mm_{self.stream}_large"
            try:
                self.objects = await self.js.object_store(bucket)
            except NotFoundError:
                self.objects = await self.js.create_object_store(
                    bucket, ObjectStoreConfig(
                        bucket=bucket, replicas=self.settings_in_use.replicas,
                        ttl=self.settings_in_use.max_age_s))
        return self.objects

    async def _disconnected(self) -> None:
        if self.connected.is_set():
            self.connected.clear()
            self.alert("lost the connection to NATS; reconnecting (publishes wait)",
                       servers=self._servers_text())

    async def _reconnected(self) -> None:
        self.reconnects += 1
        self.connected.set()
        self.alert(f"reconnected to NATS ({redact(self.nc.connected_url.geturl())})",
                   reconnects=self.reconnects)
        self._resubscribe.set()

    async def _nats_error(self, exc: Exception) -> None:
        if not self.connected.is_set() and not self._unreachable:
            self._unreachable = True
            self.alert(f"cannot reach the NATS servers ({self._servers_text()}): "
                       f"{_describe(exc)}; trying again", servers=self._servers_text())
        else:
            self.debug(f"NATS client: {_describe(exc)}")

    async def _closed(self) -> None:
        self.connected.clear()

    # -- outbound ----------------------------------------------------------------------------

    async def message(self, message: dict[str, Any]) -> None:
        meta = message.get(META_KEY)
        meta = meta if meta.__class__ is dict else {}
        host = meta.get(DESTINATION_KEY)
        qname = meta.get(DESTINATION_QNAME_KEY)
        if host.__class__ is not str or qname.__class__ is not str:
            self.refused += 1
            raise BridgeError("a message on the Bridge queue without destination_host and "
                              "destination_qname in its meta (send with destination=HOST): "
                              "not sent anywhere")
        if host == self.host:
            self.send(qname, message)  # sent to this host by its Bridge name
            return
        out_meta = {key: meta[key] for key in ("id", "send_ts", "source_hostname", "route")
                    if key in meta}
        route = out_meta.get("route")
        out_meta["route"] = (route if route.__class__ is list
                             else [out_meta.get("source_hostname", self.host)])
        body = {key: value for key, value in message.items() if key != META_KEY}
        payload = encode_body(body, out_meta)
        limit = self.settings_in_use.max_message_bytes
        if len(payload) > limit:
            self.refused += 1
            raise MessageTooLarge(len(payload), limit)
        subject = subject_for(self.stream, host, qname)
        message_id = out_meta.get("id")
        if message_id.__class__ is not str:  # not dropped as a duplicate of another
            message_id = out_meta["id"] = os.urandom(16).hex()
        headers = {"Nats-Msg-Id": message_id_for(message_id, subject)}
        await self._publish(subject, payload, headers)

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        """Publish until JetStream acknowledges (for ever while the servers are away)."""
        delay = 0.05
        attempts = 0
        while True:
            if not self.connected.is_set():
                self.set_stalled(True)
                attempts = max(attempts, 1)
                await self.connected.wait()
            self.pending_acks += 1
            try:
                if len(payload) > self.nc.max_payload - HEADER_ROOM:
                    objects = await self._objects()
                    name = headers["Nats-Msg-Id"]
                    await objects.put(name, payload)
                    ack = await self.js.publish(subject, b"", stream=self.stream,
                                                headers={**headers, OBJECT_HEADER: name})
                else:
                    ack = await self.js.publish(subject, payload, stream=self.stream,
                                                headers=headers)
                if ack.duplicate:
                    # Published before (a crash replayed it), or another message given the
                    # same id within duplicate_window_s: JetStream keeps the first.
                    self.publish_duplicates += 1
                    self.debug(f"JetStream already had message {headers['Nats-Msg-Id']} for "
                               f"{subject!r}: kept the first", subject=subject)
                else:
                    self.published += 1
                if attempts:
                    self.set_stalled(False)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the servers, not the message
                attempts += 1
                self.set_stalled(True)  # senders here are held back once 1,024 wait
                self.publish_retries += 1
                if attempts in (1, 10) or attempts % 100 == 0:
                    self.error(f"publish to {subject!r} failed ({attempts} attempts): "
                               f"{_describe(exc)}; trying again", subject=subject)
                self.objects = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
            finally:
                self.pending_acks -= 1

    # -- inbound -----------------------------------------------------------------------------

    def _read_seq(self) -> int:
        """The last stream sequence delivered here, from ``STATE_DIR/Bridge.inbound-STREAM``
        (``SEQ HOST``, the host escaped), 0 if none or recorded for another host name."""
        path = self._seq_path
        if path is None:
            return 0
        fd = self._open_record(path)
        self._seq_fd = fd
        text = os.pread(fd, RECORD_BYTES, 0).decode("ascii", "replace").strip()
        if not text:
            return 0
        seq, _, host = text.partition(" ")
        if host != escape_token(self.host) or not seq.isdigit():
            self.log(f"{path} is not a record of host {self.host!r}: going on from what "
                     "the stream's consumer for this host acknowledged")
            return 0
        return int(seq)

    def _open_record(self, path: Path) -> int:
        """The record's descriptor: a regular file of this process's user (made 0600 if there
        is none). Anything else found there (a symbolic link, a FIFO, another user's file, a
        hard link) is reported and replaced by a new empty record, never read, written or
        chmodded: a record planted there could make the Bridge skip what the stream holds
        for this host."""
        try:
            return open_own_file(path)
        except OSError as exc:
            if exc.errno is not None:  # the open itself failed (no directory, no access)
                raise BridgeError(f"cannot open {path}: {exc}") from exc
            refused = exc
        self.error(f"{path} refused ({refused}): replaced with a record of its own; going on "
                   "from what the stream's consumer for this host acknowledged")
        try:
            write_atomic(path, b"")  # renamed over the entry, never written through it
            return open_own_file(path)
        except OSError as exc:
            raise BridgeError(f"cannot open {path}: {exc}") from exc

    def _record_seq(self, seq: int) -> None:
        """One ``pwrite`` of a fixed-size record within one page: what a kill leaves is the
        old record or the new."""
        self.delivered_seq = seq
        self.state["inbound_seq"] = seq
        if self._seq_fd is not None:
            record = f"{seq} {escape_token(self.host)}".ljust(RECORD_BYTES - 1) + "\n"
            os.pwrite(self._seq_fd, record.encode("ascii"), 0)

    async def _subscribe(self) -> Any:
        """The host's durable pull consumer, made again from the next undelivered sequence."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        durable = f"mm-{escape_token(self.host)}"
        try:
            info = await self.js.consumer_info(self.stream, durable)
        except NotFoundError:
            info = None
        if info is not None:
            if self._seq_fd is None or self.delivered_seq == 0:
                # No record of ours (a new state directory): go on from what the consumer
                # saw acknowledged, not from the start of the stream.
                self.delivered_seq = max(self.delivered_seq, info.ack_floor.stream_seq or 0)
            await self.js.delete_consumer(self.stream, durable)
        start = self.delivered_seq + 1
        config = ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
            filter_subject=f"{SUBJECT_ROOT}.{self.stream}.{escape_token(self.host)}.>",
            max_ack_pending=self.settings_in_use.batch * 4, ack_wait=60.0,
            num_replicas=self.settings_in_use.replicas)
        subscription = await self.js.pull_subscribe(
            config.filter_subject, durable=durable, stream=self.stream, config=config)
        self._consumer_seq = 0
        return subscription

    async def _take_inbound(self) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        batch = self.settings_in_use.batch
        while True:
            self._resubscribe.clear()
            subscription = await self._subscribe()
            watcher = asyncio.get_running_loop().create_task(self._watch_lag(subscription))
            try:
                while not self._resubscribe.is_set():
                    try:
                        messages = await subscription.fetch(batch, timeout=1.0)
                    except (TimeoutError, NatsTimeout):
                        messages = []
                    if messages:
                        # Shielded: a stop does not cut a batch between delivery and record.
                        await asyncio.shield(self._deliver(messages))
            finally:
                watcher.cancel()
            try:
                await subscription.unsubscribe()
            except Exception:  # noqa: BLE001 - the old connection's subscription
                pass

    async def _watch_lag(self, subscription: Any) -> None:
        """Every second: how many messages for this host the stream still holds (also while
        a batch waits for room in a full queue here)."""
        while True:
            try:
                info = await subscription.consumer_info()
                self.lag = (info.num_pending or 0) + (info.num_ack_pending or 0)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a figure: try again at the next second
                pass
            await asyncio.sleep(LAG_INTERVAL_S)

    async def _deliver(self, messages: list[Any]) -> None:
        """Deliver a batch in stream order, make it safe, record it, acknowledge it.

        Deliveries are numbered by the consumer (1, 2, 3... from its creation, redeliveries
        included): a number skipped is a delivery that never reached us (a late answer to a
        fetch that had timed out, or one lost with a connection). Acknowledging past it would
        acknowledge it too (policy *all*), so the batch stops there and the consumer is made
        again from the last sequence delivered."""
        last = None
        large: list[str] = []
        for msg in messages:
            numbered = msg.metadata.sequence.consumer
            if numbered <= self._consumer_seq:
                self.redeliveries_dropped += 1  # an old delivery, seen already
                continue
            if numbered != self._consumer_seq + 1:
                self.deliveries_missed += 1
                self.debug(f"delivery {self._consumer_seq + 1} never arrived (got "
                           f"{numbered}): taking this host's messages again from stream "
                           f"sequence {self.delivered_seq + 1}")
                self._resubscribe.set()
                break
            self._consumer_seq = numbered
            seq = msg.metadata.sequence.stream
            last = msg
            if seq <= self.delivered_seq:
                self.redeliveries_dropped += 1
                continue
            before = self.delivered_seq
            qname = await self._deliver_one(msg, await self._payload(msg, large))
            if qname is not None:
                self.delivered += 1
            self.delivered_seq = seq
            if self.sends_held():
                # This one waits for room in a full queue; every one before it is safe once
                # the journals are written: record them, so that a kill while this one
                # waits (maybe for long) takes none of them again.
                await self.wait_sent(written=lambda: self._record_seq(before))
                self._record_seq(seq)
        if last is None:
            return
        await self.wait_sent()
        self._record_seq(self.delivered_seq)
        await last.ack()  # our record, not the ack, says where to go on from: no round trip
        for name in large:
            try:
                await (await self._objects()).delete(name)
            except Exception as exc:  # noqa: BLE001 - it expires with max_age_s anyway
                self.debug(f"large message {name} not removed from the object store: "
                           f"{_describe(exc)}")

    async def _payload(self, msg: Any, large: list[str]) -> bytes | None:
        name = (msg.headers or {}).get(OBJECT_HEADER)
        if not name:
            return msg.data
        while True:
            try:
                result = await (await self._objects()).get(name)
                large.append(name)
                return result.data
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - not there (expired) or servers away
                from nats.js.errors import NotFoundError
                if isinstance(exc, NotFoundError) or "not found" in str(exc).lower():
                    return None
                self.objects = None
                await asyncio.sleep(0.2)

    async def _deliver_one(self, msg: Any, payload: bytes | None) -> str | None:
        """Send one inbound message to its local queue; report (and skip) what cannot be."""
        subject = msg.subject
        try:
            qname = unescape_token(subject.split(".", 3)[3])
        except (IndexError, UnicodeDecodeError) as exc:
            self.refused += 1
            self.error(f"message on subject {subject!r} names no queue: {exc}; skipped",
                       stream_seq=msg.metadata.sequence.stream)
            return None
        if payload is None:
            self.refused += 1
            self.error(f"large message for {qname!r} is no longer in the object store; "
                       "skipped", stream_seq=msg.metadata.sequence.stream)
            return None
        try:
            message = decode_body(payload, qname)
        except BadMessage as exc:
            self.refused += 1
            self.error(f"message for {qname!r} from the stream is not valid: {exc.reason}; "
                       "skipped", stream_seq=msg.metadata.sequence.stream)
            return None
        meta = message.get(META_KEY)
        if meta.__class__ is dict:
            route = meta.get("route")
            meta["route"] = [*(route if route.__class__ is list else []), self.host]
        while True:
            try:
                self.send(qname, message, owned=True)
                return qname
            except QueueCreationRefused:
                # The daemon's rate of new queues is spent: this message waits its turn.
                await asyncio.sleep(0.05)
            except TransitError as exc:
                self.refused += 1
                self.error(f"message for {qname!r} not delivered: {exc}",
                           stream_seq=msg.metadata.sequence.stream)
                return None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
