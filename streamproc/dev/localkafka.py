"""A real single-node Apache Kafka (KRaft) for laptops, tests and the demo.

The official ``org.apache.kafka:kafka_2.13`` jars, Kafka's command-line tools
(``org.apache.kafka:kafka-tools``: console consumer and producer, topics, consumer groups)
and their runtime dependencies are fetched with Maven into
``~/.cache/streamproc/kafka-<version>-<hash>`` once; a broker then formats its own storage,
listens on free loopback ports and is stopped cleanly. Besides its PLAINTEXT listener it can
serve SASL (PLAIN, SCRAM-SHA-256) and SSL listeners, with keys made by the JDK's keytool.
Its log stays in its data directory so a failed test run can show why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from streamproc.errors import UserError

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.24.3"
BROKER_MESSAGE_MAX_BYTES = 16 * 1024 * 1024

_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.streamproc</groupId>
  <artifactId>local-kafka</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{SCALA_VERSION}</artifactId>
      <version>{KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>{KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="${sys:kafka.logs.dir}/server.log">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="org.apache.kafka.controller" level="INFO"/>
    <Root level="INFO"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""


# Kafka's own tools print their log (connection warnings and the like) to stderr only.
_LOG4J2_TOOLS = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="stderr"/></Root>
  </Loggers>
</Configuration>
"""

# `streamproc broker tool NAME`: the kafka-NAME.sh scripts of a Kafka distribution
TOOLS: dict[str, str] = {
    "console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "console-producer": "org.apache.kafka.tools.ConsoleProducer",
    "topics": "org.apache.kafka.tools.TopicCommand",
    "consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "get-offsets": "org.apache.kafka.tools.GetOffsetShell",
    "configs": "kafka.admin.ConfigCommand",
    "dump-log": "kafka.tools.DumpLogSegments",
}


class Listener(StrEnum):
    """A broker listener's security protocol (also its listener name)."""

    PLAINTEXT = "PLAINTEXT"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SSL = "SSL"
    SASL_SSL = "SASL_SSL"

    @property
    def sasl(self) -> bool:
        return self.name.startswith("SASL_")

    @property
    def ssl(self) -> bool:
        return self.name.endswith("SSL")


# every SASL listener offers both; PLAIN users live in the JAAS line, SCRAM users in storage
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256")


class LocalKafkaError(UserError):
    """The local broker could not be fetched, started or reached; the message says why."""


@dataclass(frozen=True)
class KeyStore:
    """A broker's SSL key and certificate (PKCS12) and the PEM clients trust it by."""

    path: Path
    password: str
    ca_pem: Path


def make_keystore(directory: str | Path, password: str = "streamproc-ks",
                  name: str = "broker") -> KeyStore:
    """A self-signed certificate for 127.0.0.1/localhost made with the JDK's keytool."""
    keytool = shutil.which("keytool")
    if keytool is None:
        raise LocalKafkaError("keytool not found: it comes with the JDK (OpenJDK 17 or newer)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ks, pem = d / f"{name}.p12", d / f"{name}-ca.pem"
    common = ["-keystore", str(ks), "-storepass", password, "-storetype", "PKCS12",
              "-alias", name]
    steps = [
        [keytool, "-genkeypair", *common, "-keypass", password, "-keyalg", "RSA",
         "-keysize", "2048", "-validity", "3650", "-dname", f"CN=localhost, O={name}",
         "-ext", "SAN=ip:127.0.0.1,dns:localhost", "-ext", "BC:c=ca:true"],
        [keytool, "-exportcert", "-rfc", *common, "-file", str(pem)],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LocalKafkaError(f"keytool failed: {proc.stdout}{proc.stderr}")
    return KeyStore(ks, password, pem)


def cache_root() -> Path:
    return Path(os.environ.get("STREAMPROC_CACHE", Path.home() / ".cache" / "streamproc"))


def jars_dir() -> Path:
    """Where the broker jars live; keyed by the exact dependency list that fetched them."""
    digest = hashlib.sha256(_POM.encode()).hexdigest()[:12]
    return cache_root() / f"kafka-{KAFKA_VERSION}-{digest}" / "libs"


def check_java() -> str:
    """Return ``java -version`` text, or raise with what to install."""
    java = shutil.which("java")
    if java is None:
        raise LocalKafkaError("java not found: install OpenJDK 17 or newer "
                              "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless)")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    try:
        major = int(out.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        major = 0
    if major < 17:
        raise LocalKafkaError(f"Kafka {KAFKA_VERSION} needs Java 17 or newer; found: "
                              f"{out.strip().splitlines()[0] if out else 'unknown'}")
    return out


def fetch_jars(quiet: bool = True) -> Path:
    """Fetch the broker jars with Maven unless they are cached already."""
    libs = jars_dir()
    if (libs / ".complete").exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError("mvn not found: Maven fetches the Kafka jars "
                              "(Debian/Ubuntu: apt-get install maven)")
    check_java()
    libs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "pom.xml").write_text(_POM)
        cmd = [mvn, "-B", "dependency:copy-dependencies", f"-DoutputDirectory={libs}",
               "-DincludeScope=runtime"]
        if quiet:
            cmd.insert(1, "-q")
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LocalKafkaError("Maven could not fetch the Kafka jars:\n"
                              + (proc.stdout + proc.stderr)[-4000:])
    if not list(libs.glob(f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar")):
        raise LocalKafkaError(f"Maven finished but kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar "
                              f"is not in {libs}")
    if not list(libs.glob(f"kafka-tools-{KAFKA_VERSION}.jar")):
        raise LocalKafkaError(f"Maven finished but kafka-tools-{KAFKA_VERSION}.jar is not in {libs}")
    (libs / ".complete").write_text(KAFKA_VERSION)
    return libs


def tool_command(name: str, args: Sequence[str] = ()) -> list[str]:
    """The command line of Kafka's ``kafka-NAME`` tool (see TOOLS) on the cached jars."""
    if name not in TOOLS:
        raise LocalKafkaError(f"unknown Kafka tool {name!r}; one of: {', '.join(TOOLS)}")
    libs = fetch_jars()
    config = libs.parent / "tools-log4j2.xml"
    if not config.exists():
        config.write_text(_LOG4J2_TOOLS)
    return ["java", f"-Dlog4j2.configurationFile={config}", "-cp", f"{libs}/*", TOOLS[name],
            *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


#: Bytes a partition of the local broker keeps (its oldest segments go beyond that).
LOCAL_RETENTION_BYTES = 1 << 30


class LocalBroker:
    """One Kafka process: broker and KRaft controller on loopback.

    It always has a PLAINTEXT listener (``bootstrap``); ``listeners`` adds SASL and SSL
    ones (``bootstrap_for``). SASL listeners take the PLAIN and SCRAM-SHA-256 logins of
    ``sasl_users`` (name -> password); SSL listeners need a ``keystore``.

    A broker is stopped (SIGTERM) when the thread that started it ends, however it ends
    (killed included: a benchmark or test run cut short leaves no broker behind), where
    Linux's ``setpriv`` can arrange it; a ``daemon`` outlives it (``streamproc broker
    start``).

    >>> with LocalBroker() as b:   # doctest: +SKIP
    ...     print(b.bootstrap)     # 127.0.0.1:40123
    """

    def __init__(self, data_dir: str | Path | None = None, port: int = 0,
                 heap: str = "1g", listeners: Sequence[Listener | str] = (),
                 sasl_users: Mapping[str, str] | None = None,
                 keystore: KeyStore | None = None, daemon: bool = False) -> None:
        # A temporary directory we made is ours to remove on a clean stop (benchmarks write
        # gigabytes there); a directory the caller named is left alone.
        self._owns_dir = data_dir is None
        if not 0 <= port <= 65535:
            raise LocalKafkaError(f"port {port} is not a TCP port (1-65535, or 0 for any free one)")
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="sp-kafka-"))
        self.port = port or free_port()
        self.controller_port = free_port()
        self.heap = heap
        self.ports: dict[Listener, int] = {Listener.PLAINTEXT: self.port}
        for name in listeners:
            if Listener(name) not in self.ports:
                self.ports[Listener(name)] = free_port()
        self.sasl_users = dict(sasl_users or {})
        self.keystore = keystore
        if any(lst.sasl for lst in self.ports) and not self.sasl_users:
            raise LocalKafkaError("a SASL listener needs sasl_users")
        if any(lst.ssl for lst in self.ports) and keystore is None:
            raise LocalKafkaError("an SSL listener needs a keystore (make_keystore)")
        self.daemon = daemon
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def bootstrap_for(self, listener: Listener | str) -> str:
        """The bootstrap address of one listener (PLAINTEXT, SASL_PLAINTEXT, SSL, SASL_SSL)."""
        return f"127.0.0.1:{self.ports[Listener(listener)]}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    def properties(self) -> str:
        listeners = ",".join(f"{lst}://127.0.0.1:{port}" for lst, port in self.ports.items())
        protocols = ",".join(f"{lst}:{lst}" for lst in self.ports)
        lines = [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners={listeners},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners={listeners}",
            "controller.listener.names=CONTROLLER",
            f"listener.security.protocol.map={protocols},CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={self.data_dir / 'data'}",
            # topics are created on purpose (`streamproc topics create`), never by a typo
            "auto.create.topics.enable=false",
            f"message.max.bytes={BROKER_MESSAGE_MAX_BYTES}",
            f"replica.fetch.max.bytes={BROKER_MESSAGE_MAX_BYTES}",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "group.initial.rebalance.delay.ms=0",
            "num.partitions=1",
            # Kept by size, not age: tests, the demo and the benchmarks send media whose
            # event times (the record timestamps) are years old, and age-based retention
            # deleted them at its next check, while they were being read.
            "log.retention.ms=-1",
            f"log.retention.bytes={LOCAL_RETENTION_BYTES}",
        ]
        sasl = [lst for lst in self.ports if lst.sasl]
        if sasl:
            lines.append(f"sasl.enabled.mechanisms={','.join(SASL_MECHANISMS)}")
            users = " ".join(f'user_{u}="{pw}"' for u, pw in self.sasl_users.items())
            for lst in sasl:
                prefix = f"listener.name.{lst.lower()}"
                lines.append(f"{prefix}.plain.sasl.jaas.config=org.apache.kafka.common.security"
                             f".plain.PlainLoginModule required {users};")
                lines.append(f"{prefix}.scram-sha-256.sasl.jaas.config=org.apache.kafka.common"
                             ".security.scram.ScramLoginModule required;")
        if self.keystore is not None and any(lst.ssl for lst in self.ports):
            lines += [f"ssl.keystore.location={self.keystore.path}",
                      "ssl.keystore.type=PKCS12",
                      f"ssl.keystore.password={self.keystore.password}",
                      f"ssl.key.password={self.keystore.password}"]
        return "\n".join([*lines, ""])

    def start(self, timeout: float = 90.0) -> LocalBroker:
        # another process answering on our port would pass the readiness check while
        # this broker dies failing to bind it
        for port in (*self.ports.values(), self.controller_port):
            if port_open("127.0.0.1", port):
                raise LocalKafkaError(f"port {port} is already in use on 127.0.0.1 (another "
                                      "broker?): stop it, or pick another --port")
        libs = fetch_jars()
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        props = self.data_dir / "server.properties"
        props.write_text(self.properties())
        (self.data_dir / "log4j2.xml").write_text(_LOG4J2)
        java = ["java", f"-Xmx{self.heap}", f"-Xms{self.heap}", "-XX:+UseG1GC",
                f"-Dkafka.logs.dir={self.data_dir / 'logs'}",
                f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.xml'}",
                "-cp", f"{libs}/*"]
        if not (self.data_dir / "data" / "meta.properties").exists():
            fmt = subprocess.run(
                [*java, "kafka.tools.StorageTool", "format", f"--cluster-id={_cluster_id()}",
                 "-c", str(props), *self._scram_args()],
                capture_output=True, text=True)
            if fmt.returncode != 0:
                raise LocalKafkaError(f"formatting KRaft storage failed:\n{fmt.stdout}{fmt.stderr}")
        out = open(self.data_dir / "logs" / "stdout.log", "ab")  # noqa: SIM115 - lives with proc
        self.proc = subprocess.Popen([*self._with_parent(), *java, "kafka.Kafka", str(props)],
                                     stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()
        (self.data_dir / "broker.pid").write_text(str(self.proc.pid))
        self._wait_ready(timeout)
        return self

    def _with_parent(self) -> list[str]:
        """The command prefix that signals the broker when its parent ends: the kernel's
        parent-death signal, set by util-linux's setpriv before it runs java (it survives
        the exec; a fork-time hook would not be safe with the caller's threads)."""
        setpriv = shutil.which("setpriv")
        if self.daemon or setpriv is None:  # e.g. macOS: stopped by stop() only
            return []
        return [setpriv, "--pdeathsig", "TERM"]

    def _scram_args(self) -> list[str]:
        """SCRAM users are stored in the cluster metadata, written when storage is formatted."""
        if not any(lst.sasl for lst in self.ports):
            return []
        out = []
        for user, pw in self.sasl_users.items():
            out += ["--add-scram", f"SCRAM-SHA-256=[name={user},password={pw}]"]
        return out

    def _wait_ready(self, timeout: float) -> None:
        from streamproc import kafka
        from streamproc.config import Settings

        settings = Settings(bootstrap_servers=self.bootstrap)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LocalKafkaError(f"Kafka exited with code {self.proc.returncode} during "
                                      f"start-up (logs in {self.data_dir / 'logs'}); last log "
                                      f"lines:\n{self.log_tail()}")
            if port_open("127.0.0.1", self.port):
                try:
                    admin = kafka.admin(settings, request_timeout_ms=5000)
                    try:
                        admin.describe_cluster()
                        return
                    finally:
                        admin.close()
                except Exception as e:  # broker up but not serving metadata yet
                    last = e
            time.sleep(0.25)
        if self.proc is not None:
            terminate(self.proc)  # not stop(): the logs stay for the post-mortem
        raise LocalKafkaError(f"Kafka did not become ready in {timeout:.0f}s ({last}; logs in "
                              f"{self.data_dir / 'logs'}); last log lines:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker; a temporary data directory goes with it unless the broker died on
        its own (then its logs stay for the post-mortem, and the error names the path)."""
        if self.proc is None:
            return
        died = self.proc.poll() is not None
        terminate(self.proc, timeout)
        if self._owns_dir and not died:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for f in (self.log_file, self.data_dir / "logs" / "stdout.log"):
            if f.exists():
                text += "".join(f.read_text(errors="replace").splitlines(True)[-lines:])
        return text or "(no log written)"

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def terminate(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM and wait for a clean shutdown; SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def existing_or_local(bootstrap: str | None = None,
                      data_dir: str | Path | None = None) -> Iterator[str]:
    """Bootstrap servers to use: ``bootstrap`` or STREAMPROC_BOOTSTRAP when set, else a
    LocalBroker started for the duration of the block (tests, benchmarks, the demo)."""
    given = bootstrap or os.environ.get("STREAMPROC_BOOTSTRAP")
    if given:
        yield given
        return
    with LocalBroker(data_dir) as broker:
        yield broker.bootstrap


def _cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


# --- daemon management for `streamproc broker` -----------------------------------------


def default_broker_dir() -> Path:
    return cache_root() / "broker"


def running_pid(data_dir: Path) -> int | None:
    pid_file = data_dir / "broker.pid"
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, PermissionError):
        return None
    return pid


def stop_daemon(data_dir: Path, timeout: float = 30.0) -> bool:
    """Stop a broker started by `streamproc broker start`; False if none was running."""
    pid = running_pid(data_dir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    (data_dir / "broker.pid").unlink(missing_ok=True)
    return True
