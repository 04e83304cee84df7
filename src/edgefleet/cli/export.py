"""``edgefleet export tail``: read the fleet's streams back from Kafka, as JSON lines or Parquet; and the Kafka
connection options ``edgefleet server --kafka`` shares with it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.errors import ConfigError

export_app = typer.Typer(no_args_is_help=True, help="The fleet's streams in Kafka (edgefleet server --kafka).")

KafkaSecurity = Annotated[str, typer.Option(
    "--kafka-security", envvar="EDGEFLEET_KAFKA_SECURITY", help="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")]
KafkaSasl = Annotated[str | None, typer.Option(
    "--kafka-sasl-mechanism", envvar="EDGEFLEET_KAFKA_SASL_MECHANISM", show_default=False,
    help="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a SASL --kafka-security)")]
KafkaUser = Annotated[str | None, typer.Option("--kafka-user", envvar="EDGEFLEET_KAFKA_USER", show_default=False,
                                               help="SASL user name")]
KafkaPassword = Annotated[str | None, typer.Option(
    "--kafka-password", envvar="EDGEFLEET_KAFKA_PASSWORD", show_default=False,
    help="SASL password (prefer the variable: flags show in `ps`)")]
KafkaCa = Annotated[Path | None, typer.Option("--kafka-ca", envvar="EDGEFLEET_KAFKA_CA", show_default=False,
                                              help="CA file that signed the brokers' certificates")]
KafkaCert = Annotated[Path | None, typer.Option("--kafka-cert", envvar="EDGEFLEET_KAFKA_CERT", show_default=False,
                                                help="client certificate (mutual TLS)")]
KafkaKey = Annotated[Path | None, typer.Option("--kafka-key", envvar="EDGEFLEET_KAFKA_KEY", show_default=False,
                                               help="the client certificate's key")]
KafkaTimeout = Annotated[float, typer.Option(
    "--kafka-timeout", envvar="EDGEFLEET_KAFKA_TIMEOUT_S",
    help="seconds an export round may wait for acknowledgements before it is sent again")]
KafkaPrefix = Annotated[str, typer.Option("--kafka-topic-prefix", envvar="EDGEFLEET_KAFKA_TOPIC_PREFIX",
                                          help="topics are PREFIX + telemetry, events, alerts, decisions, "
                                               "hard_examples")]


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")


def kafka_settings(bootstrap: str | None, security: str = "PLAINTEXT", sasl_mechanism: str | None = None,
                   user: str | None = None, password: str | None = None, ca: Path | None = None,
                   cert: Path | None = None, key: Path | None = None, prefix: str = "edgefleet.",
                   timeout_s: float = 15.0) -> Any:
    """KafkaSettings from the shared options; None without a bootstrap (ConfigError if other options came)."""
    if not bootstrap:
        if any((sasl_mechanism, user, ca, cert, key)) or security.upper() != "PLAINTEXT":
            raise ConfigError("the --kafka-... options need --kafka BOOTSTRAP")
        return None
    from edgefleet.server.export.settings import KafkaSettings

    return KafkaSettings(bootstrap, security_protocol=security, sasl_mechanism=sasl_mechanism, username=user,
                         password=password, ca_file=ca, cert_file=cert, key_file=key, topic_prefix=prefix,
                         timeout_s=timeout_s)


@export_app.command("tail")
def tail(kafka: Annotated[str, typer.Option("--kafka", envvar="EDGEFLEET_KAFKA", help="bootstrap HOST:PORT[,...]")],
         stream: Annotated[list[str] | None, typer.Option(
             "--stream", help="telemetry, events, alerts, decisions or hard_examples (repeatable); default: all")
         ] = None,
         output_format: Annotated[str, typer.Option("--format", help="jsonl or parquet (parquet needs pyarrow and "
                                                                      "--out)")] = "jsonl",
         out: Annotated[Path | None, typer.Option(help="write here instead of standard output")] = None,
         dedupe: Annotated[bool, typer.Option("--dedupe", help="drop messages whose id was seen (the stream is "
                                                              "at least once)")] = False,
         from_beginning: Annotated[bool, typer.Option("--from-beginning/--from-now",
                                                      help="read what the topics hold, or only what comes")] = True,
         group: Annotated[str | None, typer.Option(help="consumer group to commit offsets in")] = None,
         max_messages: Annotated[int | None, typer.Option(min=1, help="stop after this many")] = None,
         idle_exit: Annotated[float | None, typer.Option(min=0.1, help="stop after this many seconds without a "
                                                                       "message")] = None,
         security: KafkaSecurity = "PLAINTEXT", sasl_mechanism: KafkaSasl = None, user: KafkaUser = None,
         password: KafkaPassword = None, ca: KafkaCa = None, cert: KafkaCert = None, key: KafkaKey = None,
         prefix: KafkaPrefix = "edgefleet.") -> None:
    """Print (or write) the fleet's exported streams: one JSON envelope per line, or a Parquet file."""
    from edgefleet.server.export.consumer import TailOptions
    from edgefleet.server.export.consumer import tail as run_tail
    from edgefleet.server.export.envelope import TOPICS

    streams = tuple(stream or TOPICS)
    unknown = sorted(set(streams) - set(TOPICS))
    if unknown:
        raise ConfigError(f"--stream {unknown[0]!r}: one of {', '.join(TOPICS)}")
    if output_format not in ("jsonl", "parquet"):
        raise ConfigError(f"--format must be jsonl or parquet, not {output_format!r}")
    writer: _JsonlWriter | _ParquetWriter = _ParquetWriter(out) if output_format == "parquet" else _JsonlWriter(out)
    settings = kafka_settings(kafka, security, sasl_mechanism, user, password, ca, cert, key, prefix)
    options = TailOptions(streams=streams, from_beginning=from_beginning, dedupe=dedupe, group=group,
                          max_messages=max_messages, idle_exit_s=idle_exit)
    try:
        counts = run_tail(settings, options, writer.write)
    finally:
        writer.close()
    typer.echo(f"{counts['emitted']} messages ({counts['duplicates']} duplicates dropped, "
               f"{counts['unreadable']} unreadable)", err=True)


class _JsonlWriter:
    def __init__(self, out: Path | None) -> None:
        self.file = out.open("w") if out is not None else sys.stdout

    def write(self, message: dict[str, Any]) -> None:
        self.file.write(json.dumps(message, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self.file is not sys.stdout:
            self.file.close()
        else:
            self.file.flush()


class _ParquetWriter:
    """Rows of (schema, version, id, key, seq, export_seq, queued, conforms, data as JSON text)."""

    def __init__(self, out: Path | None) -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise ConfigError("--format parquet needs pyarrow, which is not installed (pip install pyarrow); "
                              "use --format jsonl") from exc
        if out is None:
            raise ConfigError("--format parquet needs --out FILE.parquet")
        self.out = out
        self.rows: list[dict[str, Any]] = []

    def write(self, message: dict[str, Any]) -> None:
        self.rows.append({**{k: message.get(k) for k in ("schema", "version", "id", "key", "seq", "export_seq",
                                                          "queued", "conforms")},
                          "data": json.dumps(message.get("data", message.get("raw")))})

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(self.rows), str(self.out))
