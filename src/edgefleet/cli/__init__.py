"""``edgefleet``: one command with subcommands. Errors print one line and exit non-zero."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from edgefleet.cli.export import (
    KafkaCa,
    KafkaCert,
    KafkaKey,
    KafkaPassword,
    KafkaPrefix,
    KafkaSasl,
    KafkaSecurity,
    KafkaTimeout,
    KafkaUser,
    kafka_settings,
)
from edgefleet.cli.extras import missing_extra, require
from edgefleet.errors import EdgefleetError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Take a trained model to a fleet of edge devices and keep it healthy there.")
console = Console(stderr=True)


@app.command("server")
def server(data_dir: Annotated[Path, typer.Option(help="state, artifacts and the SQLite database")],
           port: Annotated[int, typer.Option(help="HTTP port (0 = any free port)")] = 8080,
           host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
           mqtt_url: Annotated[str | None, typer.Option(help="external broker; default: embedded")] = None,
           db_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL; default: SQLite in DATA_DIR")] = None,
           trusted_key: Annotated[list[Path] | None, typer.Option(help="signing.pub to trust")] = None,
           replica: Annotated[str, typer.Option(
               envvar="EDGEFLEET_REPLICA", help="stable name of this replica (its MQTT client ids)")] = "server",
           operator_token: Annotated[str | None, typer.Option(
               envvar="EDGEFLEET_OPERATOR_TOKEN", show_default=False,
               help="operator API token (prefer the variable: flags show in `ps`); default: DATA_DIR/operator.token, "
                    "created if missing")] = None,
           artifact_dir: Annotated[Path | None, typer.Option(
               envvar="EDGEFLEET_ARTIFACT_DIR", help="artifact store, shared by replicas; default: DATA_DIR/artifacts")
           ] = None,
           broker_auth_dir: Annotated[Path | None, typer.Option(
               envvar="EDGEFLEET_BROKER_AUTH_DIR",
               help="with --mqtt-url: where Mosquitto reads the password/ACL files this server writes (and its pid "
                    "file, to reload them)")] = None,
           device_mqtt_url: Annotated[str | None, typer.Option(
               envvar="EDGEFLEET_DEVICE_MQTT_URL", help="broker address handed to devices; default: the server's")
           ] = None,
           mqtt5: Annotated[bool, typer.Option(
               "--mqtt5/--no-mqtt5", envvar="EDGEFLEET_MQTT5",
               help="MQTT v5 with an external broker (shared telemetry subscription); --no-mqtt5 for 3.1.1")] = True,
           tick: Annotated[float, typer.Option(
               envvar="EDGEFLEET_TICK_S", help="orchestrator period in seconds")] = 1.0,
           broker_port: Annotated[int | None, typer.Option(
               envvar="EDGEFLEET_BROKER_PORT", show_default=False,
               help="the embedded broker's port; default: the one it had last time (DATA_DIR/broker/port), else a "
                    "free one")] = None,
           max_upload_mb: Annotated[int, typer.Option(
               envvar="EDGEFLEET_MAX_UPLOAD_MB", help="largest bundle upload, MiB")] = 256,
           max_uploads: Annotated[int, typer.Option(
               envvar="EDGEFLEET_MAX_UPLOADS", help="bundle uploads at once; more get 429")] = 2,
           max_json_kb: Annotated[int, typer.Option(
               envvar="EDGEFLEET_MAX_JSON_KB", help="largest JSON request body, KiB")] = 1024,
           max_json_depth: Annotated[int, typer.Option(
               envvar="EDGEFLEET_MAX_JSON_DEPTH", help="deepest nesting of a JSON request body")] = 32,
           tls: Annotated[bool, typer.Option(
               "--tls", envvar="EDGEFLEET_TLS", help="HTTPS, MQTT over mutual TLS, device certificates from the fleet "
                                                     "CA in DATA_DIR/pki (created on first start)")] = False,
           tls_name: Annotated[list[str] | None, typer.Option(
               help="another host name or address for the server certificate (repeatable)")] = None,
           insecure: Annotated[bool, typer.Option(
               "--insecure", help="allow plain HTTP and MQTT on a non-loopback --host")] = False,
           kafka: Annotated[str | None, typer.Option(
               envvar="EDGEFLEET_KAFKA", show_default=False,
               help="export telemetry, events, alerts, rollout decisions and hard examples to this Kafka bootstrap "
                    "HOST:PORT[,...]")] = None,
           kafka_security: KafkaSecurity = "PLAINTEXT", kafka_sasl_mechanism: KafkaSasl = None,
           kafka_user: KafkaUser = None, kafka_password: KafkaPassword = None, kafka_ca: KafkaCa = None,
           kafka_cert: KafkaCert = None, kafka_key: KafkaKey = None, kafka_topic_prefix: KafkaPrefix = "edgefleet.",
           kafka_timeout: KafkaTimeout = 15.0) -> None:
    """Run the control plane: REST API, MQTT ingest, and (by default) an embedded broker.

    Every option after --trusted-key also reads the environment variable shown; a flag wins over it.
    """
    require("server")
    from edgefleet.server.main import ServerSettings, run_server

    settings = ServerSettings(data_dir=data_dir, host=host, port=port, mqtt_url=mqtt_url, db_url=db_url,
                              trusted_keys=trusted_key or [], replica=replica, operator_token=operator_token,
                              artifact_dir=artifact_dir, broker_auth_dir=broker_auth_dir,
                              device_mqtt_url=device_mqtt_url, mqtt5=mqtt5, tick_s=tick, broker_port=broker_port,
                              max_upload_mb=max_upload_mb, max_uploads=max_uploads, max_json_kb=max_json_kb,
                              max_json_depth=max_json_depth, tls=tls, tls_names=tls_name or [],
                              insecure=insecure,
                              kafka=kafka_settings(kafka, kafka_security, kafka_sasl_mechanism, kafka_user,
                                                   kafka_password, kafka_ca, kafka_cert, kafka_key, kafka_topic_prefix,
                                                   kafka_timeout))
    setup_logging()
    run_server(settings)


@app.command("demo")
def demo(workdir: Annotated[Path | None, typer.Option(help="keep everything here (default: a temp dir)")] = None,
         scenario: Annotated[str, typer.Option(help="watch (BasicMotions time series) or camera (digit frames)")]
         = "watch",
         devices: Annotated[int, typer.Option(min=1, max=20, help="number of agent processes")] = 5,
         duration: Annotated[float, typer.Option(min=5, help="seconds a device's replay of its test rows may take")]
         = 20.0,
         epochs: Annotated[int, typer.Option(min=1, help="training epochs")] = 60) -> None:
    """Build a dataset's default model as `edgefleet build --dataset` does, serve it, roll it out in waves to local
    agents that replay the test rows, then summarize on-device against build-time accuracy."""
    require("demo", "server", "build", "train", "data", *(("camera",) if scenario == "camera" else ()))
    from edgefleet.demo import DemoSettings, run_demo

    run_demo(DemoSettings(workdir=workdir, scenario=scenario, devices=devices, duration_s=duration, epochs=epochs))


@app.command("coap-gateway")
def coap_gateway(mqtt_url: Annotated[str, typer.Option(
                     envvar="EDGEFLEET_MQTT_URL",
                     help="the broker the devices' MQTT credentials are for (the server's: mqtt_url in its "
                          "server.json)")],
                 port: Annotated[int, typer.Option(min=1, max=65535, help="UDP port")] = 5683,
                 host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
                 info_file: Annotated[Path | None, typer.Option(help="write {\"coap_url\": ...} here once listening")]
                 = None) -> None:
    """Serve constrained devices over CoAP: GET /d/DEVICE/desired, POST /d/DEVICE/telemetry|events|reported, with
    ?password=THE_DEVICE'S_MQTT_PASSWORD; the broker checks that login and its topic rules as for MQTT."""
    require("coap-gateway")
    from edgefleet.server.coap import GatewaySettings, run_gateway

    setup_logging()
    run_gateway(GatewaySettings(mqtt_url=mqtt_url, host=host, port=port, info_file=info_file))


def setup_logging() -> None:
    """Log lines for the long-running processes (server, agent)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _register_groups() -> None:
    from edgefleet.cli.agent import agent_app
    from edgefleet.cli.bundle import bundle_app, keys_app

    app.add_typer(keys_app, name="keys")
    app.add_typer(bundle_app, name="bundle")
    from edgefleet.cli.fleet import device_app, model_app, rollout_app

    app.add_typer(device_app, name="device")
    app.add_typer(model_app, name="model")
    app.add_typer(rollout_app, name="rollout")
    __import__("edgefleet.cli.build", fromlist=["register"]).register(app)
    app.add_typer(agent_app, name="agent")
    __import__("edgefleet.cli.upstream", fromlist=["register"]).register(app)
    __import__("edgefleet.cli.learn", fromlist=["register"]).register(app)
    __import__("edgefleet.cli.fl", fromlist=["register"]).register(app)
    __import__("edgefleet.cli.retrain", fromlist=["register"]).register(app)
    __import__("edgefleet.cli.export", fromlist=["register"]).register(app)
    __import__("edgefleet.cli.twin", fromlist=["register"]).register(app)


_register_groups()


def main() -> None:
    """Console entry point: run the command, turning edgefleet errors into one line and an exit code."""
    try:
        app(prog_name="edgefleet")  # usage errors: typer prints them and exits 2
    except ModuleNotFoundError as exc:  # an optional extra's package, reached by a command: one line naming it
        missing = missing_extra(exc, _command(sys.argv[1:]))
        if missing is None:
            raise
        console.print(f"[red]edgefleet: error:[/red] {escape(str(missing))}", highlight=False, soft_wrap=True)
        sys.exit(missing.exit_code)
    except EdgefleetError as exc:
        console.print(f"[red]edgefleet: error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


def _command(argv: list[str]) -> str:
    """The top-level command named on the command line (the first word that is not an option)."""
    return next((arg for arg in argv if not arg.startswith("-")), "")
