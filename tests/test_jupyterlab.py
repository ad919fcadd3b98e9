"""The README's reading path: `jupyter lab nbs/` starts (JupyterLab is installed by setup), serves the chapters over
its REST API on a loopback port, and stops cleanly."""
import os, secrets, signal, socket, subprocess, sys, time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

def free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def test_jupyter_lab_serves_the_chapters(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    jupyter = Path(sys.executable).with_name("jupyter")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path/"runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path/"config"),
           "JUPYTER_DATA_DIR": str(tmp_path/"data")}
    proc = subprocess.Popen([str(jupyter), "lab", "nbs/", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0"]
                            + (["--allow-root"] if os.geteuid() == 0 else []),   # CI containers run as root
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base, deadline, status = f"http://127.0.0.1:{port}", time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            try: status = httpx.get(f"{base}/api/status", params={"token": token}, timeout=2); break
            except httpx.TransportError: time.sleep(0.5)
        assert status is not None and status.status_code == 200, f"jupyter lab did not answer: {proc.stdout.read1().decode() if proc.poll() is not None else ''}"
        listing = httpx.get(f"{base}/api/contents", params={"token": token}, timeout=10).json()
        names = {c["name"] for c in listing["content"]}
        assert {"00_core.ipynb", "01b_data.ipynb", "08_mlops.ipynb"} <= names, names
        assert httpx.get(f"{base}/lab", params={"token": token}, timeout=10).status_code == 200
        assert httpx.get(f"{base}/api/contents", timeout=10).status_code == 403      # no token, no access
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try: proc.wait(timeout=30)
            except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert proc.returncode is not None
