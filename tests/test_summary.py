"""Parameter counts of every network at the official size (`python -m idguard_jax.networks.summary`)."""
import subprocess
import sys


def test_summary_counts():
    out = subprocess.run([sys.executable, "-m", "idguard_jax.networks.summary"], capture_output=True,
                         text=True, check=True, timeout=300).stdout.split("\n")
    counts = dict(line.split() for line in out if line)
    assert counts["generator"] == "7850819"
    assert counts["stargan"] == "8430528"
    assert counts["aggan"] == "8433664"
    assert counts["fpgan"] == "8430528"
    assert {k: counts[k] for k in ("relgan", "hisd", "arcface", "irse50", "iresnet50",
                                   "iresnet100", "vggface", "dlib")} == {
        "relgan": "8434345", "hisd": "19043939", "arcface": "52193215", "irse50": "43797696",
        "iresnet50": "43590848", "iresnet100": "65156160", "vggface": "145002878",
        "dlib": "5614592"}
