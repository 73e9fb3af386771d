"""Cost of identity's crypto per call, so the default signing algorithm is chosen from a measurement.

    python -m bench.identity_crypto [--seconds 1.0]

For ES256, Ed25519 and RS256 (joserfc): sign a typical access token, verify it with joserfc alone
(signature only), and the full ``runtime.auth.TokenVerifier`` path without its cache (header checks, key
lookup, signature, claims). Then argon2id hash and verify with the parameters identity uses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import Callable

from joserfc import jwt

from identity.keys import KeyRing
from identity.passwords import DEFAULT_PARAMETERS, Passwords
from identity.tokens import TokenIssuer
from runtime.auth import TokenVerifier

ALGORITHMS = ("ES256", "Ed25519", "RS256")
ISSUER = "https://id.bench"
AUDIENCE = "ecom-api"


def per_call(fn: Callable[[], object], seconds: float) -> float:
    """Best-of-5 mean seconds per call, each round running about seconds/5."""
    fn()
    n = 1
    while True:  # calibrate
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= seconds / 20:
            break
        n *= 2
    n = max(1, int(n * (seconds / 5) / dt))
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t) / n)
    return min(rounds)


def bench_jwt(seconds: float) -> list[tuple[str, float, float, float, int]]:
    rows = []
    for alg in ALGORITHMS:
        ring = KeyRing()
        ring.rotate(alg)
        _key, _imported = ring.signing_key()
        issuer = TokenIssuer(ring, ISSUER, AUDIENCE)
        token, _ = issuer.issue_access_token(
            "3f1c2a9e-5b7d-4e0f-9a61-2c8d7e4b1a05", "storefront", ["openid", "cart", "orders"], ["customer"]
        )
        public = ring.jwks()
        from joserfc.jwk import KeySet

        pub_key = KeySet.import_key_set(public).keys[0]

        # B023: per_call runs each closure to completion within this iteration, so the late binding is harmless
        sign = per_call(lambda: issuer.issue_access_token("u", "storefront", ["cart", "orders"], ["customer"]), seconds)  # noqa: B023
        verify_sig = per_call(lambda: jwt.decode(token, pub_key, algorithms=[alg]), seconds)  # noqa: B023

        verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=ALGORITHMS, cache_size=0)
        verifier.set_jwks(public)
        loop = asyncio.new_event_loop()
        try:
            coro_verify = verifier.verify

            def full() -> None:
                c = coro_verify(token)  # noqa: B023 run only within this iteration (see above)
                try:
                    c.send(None)  # no I/O for a known kid: completes in one step
                except StopIteration:
                    return
                raise AssertionError("verify suspended")

            verify_full = per_call(full, seconds)
            loop.run_until_complete(verifier.close())
        finally:
            loop.close()
        rows.append((alg, sign, verify_sig, verify_full, len(token)))
    return rows


def bench_argon2(rounds: int) -> tuple[float, float]:
    pw = Passwords(DEFAULT_PARAMETERS, max_workers=1)
    h = pw.hash_sync("Correct horse 9")
    hashes, verifies = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        pw.hash_sync("Correct horse 9")
        hashes.append(time.perf_counter() - t)
        t = time.perf_counter()
        pw.verify_sync("Correct horse 9", h)
        verifies.append(time.perf_counter() - t)
    return statistics.median(hashes), statistics.median(verifies)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per operation")
    parser.add_argument("--argon2-rounds", type=int, default=7)
    args = parser.parse_args(argv)

    import cryptography
    import joserfc

    print(
        f"python {platform.python_version()} | joserfc {joserfc.__version__} | cryptography {cryptography.__version__}"
        f" | {platform.machine()} x{os.cpu_count()} CPUs"
    )
    print()
    print("JWT access token (one thread, per call)")
    print(f"{'alg':<9}{'sign':>12}{'verify sig':>14}{'verify full':>14}{'verify/s':>11}{'token':>8}")
    rows = bench_jwt(args.seconds)
    for alg, sign, vsig, vfull, size in rows:
        print(f"{alg:<9}{sign * 1e6:>10.1f}us{vsig * 1e6:>12.1f}us{vfull * 1e6:>12.1f}us{1 / vfull:>11,.0f}{size:>7}B")
    print("  verify sig  = joserfc jwt.decode (signature only)")
    print("  verify full = TokenVerifier.verify without cache (header, kid, alg/key match, signature, claims)")
    print()
    p = DEFAULT_PARAMETERS
    h, v = bench_argon2(args.argon2_rounds)
    print(
        f"argon2id m={p.memory_cost // 1024} MiB t={p.time_cost} p={p.parallelism} (median of {args.argon2_rounds}):"
        f" hash {h * 1e3:.1f} ms, verify {v * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
