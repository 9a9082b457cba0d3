"""An emulated two-node cluster on one Linux machine: two network namespaces joined by a veth pair
whose both ends are shaped with ``tc tbf`` (token bucket filter), and the ``mpirun`` command line
that starts one rank in each namespace so that MPI (and Horovod over MPI) talks over that link.

    with EmulatedLink("1gbit") as link:                # root only; needs ip, tc, mpirun, unshare
        subprocess.run(link.mpirun_command([sys.executable, "-m", "hvdcomp.cli.main", ...]))
    # namespaces and veth removed here, also on error or Ctrl-C

Layout (``tag`` = the launcher's pid, unique per launcher process):

    namespace hvdc-<tag>-0               namespace hvdc-<tag>-1
      mpi0 10.77.X.1/24  <== veth ==>      mpi0 10.77.X.2/24       X = 1 + pid mod 250
      tbf rate R (egress)                   tbf rate R (egress)     (both directions shaped)

Both ends are called ``mpi0`` inside their namespace, so ``btl_tcp_if_include mpi0`` holds on both
sides. ``mpirun`` runs inside namespace 0 (it sees 10.77.X.1 as local and starts rank 0 there) and
reaches namespace 1 through the rsh agent :file:`hvdcomp/scripts/nsrsh.sh`, which replaces ssh: it
runs Open MPI's daemon in the namespace that owns the target address (mapping in the environment
variable ``HVDCOMP_NSRSH_MAP``). Each side also gets its own UTS namespace and hostname, so the two
ranks look like two nodes. The addresses live only inside these namespaces; nothing is routed.

Shaping: ``tc qdisc add dev mpi0 root tbf rate R burst B latency L`` on both ends; tbf shapes
accurately (≈96 % of R measured, /work/shared/slurm/README.md). ``netem`` (delay, loss) is missing
from this machine's kernel, so only bandwidth is emulated, not latency.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

#: tools the emulated link needs, and what each is for
REQUIRED_TOOLS = {"ip": "namespaces, veth, addresses (iproute2)",
                  "tc": "bandwidth shaping (iproute2)",
                  "mpirun": "launching the ranks (Open MPI)",
                  "unshare": "a hostname per namespace (util-linux)"}
#: prefix of every namespace this module creates; `ip netns list | grep hvdc-` finds leftovers
NAMESPACE_PREFIX = "hvdc-"
INTERFACE = "mpi0"
AGENT = Path(__file__).with_name("scripts") / "nsrsh.sh"

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)\s*$", re.IGNORECASE)
_UNIT = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
UNSHAPED = ("none", "unshaped")


class LinkError(RuntimeError):
    """The emulated link cannot be set up (not root, a tool missing, a bad rate)."""


def parse_rate(rate: str) -> Optional[int]:
    """``"1gbit"`` -> 1_000_000_000 bits/s (tc's decimal units); ``"unshaped"``/``"none"`` -> None
    (namespaces and veth, no qdisc). ValueError naming the accepted forms otherwise."""
    text = str(rate).strip().lower()
    if text in UNSHAPED:
        return None
    match = _RATE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"link rate {rate!r} is not understood: give a positive number with one "
                         "of the units bit, kbit, mbit, gbit, tbit (e.g. 1gbit, 100mbit, 2.5gbit), "
                         "or 'unshaped' for the bare veth")
    bits = float(match.group(1)) * _UNIT[match.group(2).lower()]
    if bits < 8000:
        raise ValueError(f"link rate {rate!r} is below 8 kbit/s: tbf cannot shape usefully there")
    return int(bits)


def tbf_arguments(bits_per_s: int) -> List[str]:
    """``tc`` arguments for a token bucket at ``bits_per_s``.

    burst: the bucket must hold at least one timer tick of traffic, or tbf undershoots the rate;
    rate/2000 bytes (0.5 ms of traffic) with a floor of 32 KiB matches the verified recipe
    (64 kB at 1 Gbit/s, 32 kB at 100 Mbit/s gave 96 % of the rate). latency bounds the queue
    (rate × latency bytes may wait); it only matters for drops, and TCP backs off before them."""
    burst = max(32 * 1024, bits_per_s // 8 // 2000)
    latency_ms = 20 if bits_per_s >= 10**9 else 100
    return ["tbf", "rate", str(bits_per_s), "burst", str(burst), "latency", f"{latency_ms}ms"]


def missing_tools(path: Optional[str] = None) -> List[str]:
    """The names of :data:`REQUIRED_TOOLS` not found on ``path`` (default: ``$PATH``)."""
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool, path=path) is None]


def check_can_emulate() -> None:
    """LinkError naming what is missing: the tools first (they are needed whoever runs), then
    root."""
    missing = missing_tools()
    if missing:
        raise LinkError("--link needs " + ", ".join(f"{t} ({REQUIRED_TOOLS[t]})" for t in missing)
                        + " on PATH, which this machine lacks: install iproute2 / Open MPI / "
                        "util-linux, or run without --link (e.g. `mpirun -np 2 hvdcomp bench ...`)")
    if os.geteuid() != 0:
        raise LinkError("--link creates network namespaces and tc qdiscs, which needs root: run "
                        "it as root (e.g. with sudo), or run without --link under mpirun")


def _run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise LinkError(f"`{' '.join(args)}` failed (exit {done.returncode}): "
                        f"{(done.stderr or done.stdout).strip()}")
    return done


def our_namespaces() -> List[str]:
    """Every namespace whose name starts with :data:`NAMESPACE_PREFIX` (this or earlier runs)."""
    done = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in done.stdout.splitlines()
            if line.strip().startswith(NAMESPACE_PREFIX)]


class EmulatedLink:
    """Two namespaces joined by a shaped veth; a context manager that removes them on exit.

    ``rate``: a tc rate (``"1gbit"``, ``"100mbit"``) or ``"unshaped"``. ``tag`` makes names unique
    (default: the launcher's pid; names are
    ``hvdc-<tag>-0/1`` and, briefly in the root namespace, veth ``hvdc<tag>a/b``)."""

    def __init__(self, rate: str, tag: Optional[str] = None):
        self.rate = str(rate)
        self.bits_per_s = parse_rate(rate)
        pid = os.getpid()
        self.tag = str(tag or pid)
        if not re.fullmatch(r"[0-9A-Za-z]{1,8}", self.tag):
            raise ValueError(f"link tag {self.tag!r} must be 1 to 8 letters or digits")
        self.namespaces = [f"{NAMESPACE_PREFIX}{self.tag}-{i}" for i in range(2)]
        subnet = 1 + pid % 250   # 10.77.0.x is the shared recipe's; ours start at 10.77.1.x
        self.addresses = [f"10.77.{subnet}.1", f"10.77.{subnet}.2"]
        self.hostnames = [f"hvdc-node{i}" for i in range(2)]
        # veth names live briefly in the root namespace: ≤ 15 characters, unique per launcher
        self._veth = [f"hvdc{self.tag}a", f"hvdc{self.tag}b"]
        self._tmpdir: Optional[tempfile.TemporaryDirectory] = None
        self.hostfile: Optional[Path] = None
        self.agent: Optional[Path] = None
        self.created = False

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "EmulatedLink":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        check_can_emulate()
        self.created = True    # from here on down() must run, whatever fails next
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", self._veth[0], "type", "veth", "peer", "name", self._veth[1]])
        for ns, veth, address in zip(self.namespaces, self._veth, self.addresses):
            _run(["ip", "link", "set", veth, "netns", ns])
            _run(["ip", "-n", ns, "link", "set", veth, "name", INTERFACE])
            _run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", INTERFACE])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "link", "set", INTERFACE, "up"])
        if self.bits_per_s is not None:
            for ns in self.namespaces:   # egress of both ends: both directions shaped
                try:
                    _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", INTERFACE,
                          "root", *tbf_arguments(self.bits_per_s)])
                except LinkError as exc:
                    raise LinkError(f"{exc} "
                                    "(does this kernel have the tbf qdisc, sch_tbf?)") from None
        self._tmpdir = tempfile.TemporaryDirectory(prefix=f"hvdc{self.tag}-")
        self.hostfile = Path(self._tmpdir.name, "hostfile")
        self.hostfile.write_text("".join(f"{a} slots=1\n" for a in self.addresses))
        # a private executable copy of the agent: an installed package may have lost the mode bit
        self.agent = Path(self._tmpdir.name, AGENT.name)
        shutil.copyfile(AGENT, self.agent)
        self.agent.chmod(0o755)

    def down(self) -> None:
        """Kill what still runs inside our namespaces (our own ranks, by pid), delete them (which
        deletes the veth pair), and remove the hostfile. Safe to call twice or after a failed
        up()."""
        if not self.created:
            return
        existing = set(our_namespaces())
        for ns in self.namespaces:
            if ns not in existing:
                continue
            for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run(["ip", "netns", "del", ns], check=False)
        for veth in self._veth:   # left in the root namespace if up() failed half-way
            if _run(["ip", "link", "show", veth], check=False).returncode == 0:
                _run(["ip", "link", "del", veth], check=False)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
        self.created = False

    # --- launching ---------------------------------------------------------------------------
    def agent_map(self) -> str:
        """``address=namespace=hostname`` pairs for :file:`scripts/nsrsh.sh`."""
        return ",".join(f"{a}={ns}={h}" for a, ns, h in
                        zip(self.addresses, self.namespaces, self.hostnames))

    def environment(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Environment for :meth:`mpirun_command` (rsh agent map, running as root allowed)."""
        env = dict(os.environ if base is None else base)
        env.update(HVDCOMP_NSRSH_MAP=self.agent_map(), OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        return env

    def mpirun_command(self, argv: Sequence[str]) -> List[str]:
        """``ip netns exec <ns0> unshare --uts sh -c 'hostname …; exec mpirun …' argv``: 2 ranks,
        one per namespace, TCP over ``mpi0`` only (no shared memory between the "nodes")."""
        if self.hostfile is None:
            raise LinkError("the emulated link is not up: use `with EmulatedLink(rate) as link:`")
        mpirun = ["mpirun", "-np", "2", "--hostfile", str(self.hostfile), "--map-by", "node",
                  "--bind-to", "none",
                  "--mca", "plm", "rsh", "--mca", "plm_rsh_agent", str(self.agent),
                  "--mca", "ras", "^slurm",          # also inside an sbatch job
                  "--mca", "pml", "ob1", "--mca", "btl", "tcp,self",
                  "--mca", "btl_tcp_if_include", INTERFACE,
                  "--mca", "oob_tcp_if_include", INTERFACE,
                  "--mca", "btl_base_warn_component_unused", "0"]
        return ["ip", "netns", "exec", self.namespaces[0], "unshare", "--uts", "sh", "-c",
                f'hostname {self.hostnames[0]}; exec "$@"', "sh", *mpirun, *argv]

    def describe(self) -> Dict[str, object]:
        return {"rate": self.rate, "bits_per_s": self.bits_per_s, "namespaces": self.namespaces,
                "addresses": self.addresses,
                "qdisc": None if self.bits_per_s is None else " ".join(
                    tbf_arguments(self.bits_per_s))}


def run_across_link(rate: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> int:
    """Create the link, run ``argv`` in 2 ranks across it, remove the link; the launcher's exit
    code. Ctrl-C or SIGTERM stop the ranks and still remove the namespaces."""
    link = EmulatedLink(rate)
    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum, frame):   # turn SIGTERM into an exception so `finally` runs
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    proc = None
    try:
        link.up()
        environment = link.environment(env)
        environment["HVDCOMP_BENCH_LINK"] = link.rate
        proc = subprocess.Popen(link.mpirun_command(argv), env=environment,
                                start_new_session=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if proc is not None and proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=5)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        link.down()
        signal.signal(signal.SIGTERM, previous)
