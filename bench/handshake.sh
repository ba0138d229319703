#!/usr/bin/env bash
# Hybrid vs classic handshake cost, measured in one criterion run, then the
# ratios. Usage: bench/handshake.sh [extra criterion args]
# Output: a table on stdout; raw data under target/criterion/.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo bench -p mesh-proto --bench handshake -- --noplot "$@" >&2

python3 - <<'PY'
import json, os
base = "target/criterion"
def est(group, name):
    with open(os.path.join(base, group, name, "new", "estimates.json")) as f:
        e = json.load(f)
    return e["median"]["point_estimate"] / 1e3  # ns -> us

classic = est("handshake", "classic_xx")
rows = [
    ("classic Noise_XX_25519_ChaChaPoly_BLAKE2s (reference)", classic),
    ("hybrid XXhfs + ML-KEM-1024 (libcrux, ours)", est("handshake", "hybrid_xxhfs_mlkem1024")),
    ("hybrid XXhfs + Kyber1024 (pqcrypto-kyber, snow stock)", est("handshake", "hybrid_xxhfs_pqcrypto_kyber")),
    ("pqmesh exchange (hybrid + certs + checks + PSK + confirm)", est("handshake", "pqmesh_exchange")),
]
print(f"{'full handshake, both sides, one core':62} {'median us':>10} {'per s':>8} {'x classic':>9}")
for name, us in rows:
    print(f"{name:62} {us:10.1f} {1e6/us:8.0f} {us/classic:9.2f}")
print()
lib = est("kem", "libcrux_ml_kem_1024")
print(f"{'ML-KEM-1024 keygen+encaps+decaps, one core':62} {'median us':>10} {'x libcrux':>9}")
for name, key in [
    ("pqmesh KEM as snow calls it (libcrux unpacked + checks + RNG)", "pqmesh_kem"),
    ("libcrux-ml-kem packed API (AVX2 when the CPU has it)", "libcrux_ml_kem_1024"),
    ("RustCrypto ml-kem", "rustcrypto_ml_kem_1024"),
    ("pqcrypto-kyber 0.8.1 (unmaintained; reference)", "pqcrypto_kyber1024"),
]:
    us = est("kem", key)
    print(f"{name:62} {us:10.1f} {us/lib:9.2f}")
PY
