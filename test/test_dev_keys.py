"""The development key is created once even when many processes start together on an empty instance/."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

from fractal.auth.dev_keys import _public_pem_of, ensure_dev_keypair, mint_token
from fractal.config import DEV_KEY_MARKER

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 16

# Each process imports first (the slow part), then waits for the go file so that all of them race for real.
RACER = """
import hashlib, json, sys, time
from pathlib import Path
from fractal.auth.dev_keys import ensure_dev_keypair
directory, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
pair = ensure_dev_keypair(directory / "dev_jwt_private.pem", directory / "dev_jwt_public.pem")
print(json.dumps({
    "private": hashlib.sha256(pair.private_pem.encode()).hexdigest(),
    "public": hashlib.sha256(pair.public_pem.encode()).hexdigest(),
}))
"""


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_many_processes_on_an_empty_directory_all_end_up_with_one_key(tmp_path: Path) -> None:
    directory = tmp_path / "instance"  # does not exist yet, like a fresh volume's subdirectory
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(directory), str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    time.sleep(1.5)  # let every process finish importing
    go.touch()
    answers = []
    for racer in racers:
        out, err = racer.communicate(timeout=60)
        assert racer.returncode == 0, err
        answers.append(json.loads(out))

    private_pem = (directory / "dev_jwt_private.pem").read_text()
    public_pem = (directory / "dev_jwt_public.pem").read_text()
    assert {answer["private"] for answer in answers} == {digest(private_pem)}
    assert {answer["public"] for answer in answers} == {digest(public_pem)}
    assert public_pem.startswith(DEV_KEY_MARKER)
    assert _public_pem_of(private_pem) in public_pem  # the public key belongs to the private key that won
    assert stat.S_IMODE((directory / "dev_jwt_private.pem").stat().st_mode) == 0o600
    assert sorted(path.name for path in directory.iterdir()) == ["dev_jwt_private.pem", "dev_jwt_public.pem"]


def test_an_existing_key_is_kept_and_a_missing_public_half_is_restored(tmp_path: Path) -> None:
    private_path, public_path = tmp_path / "private.pem", tmp_path / "public.pem"
    first = ensure_dev_keypair(private_path, public_path)
    public_path.unlink()  # a process stopped between the two files
    again = ensure_dev_keypair(private_path, public_path)
    assert again == first
    assert public_path.read_text() == first.public_pem
    token = mint_token(again.private_pem, user_id="u")
    assert token.count(".") == 2
