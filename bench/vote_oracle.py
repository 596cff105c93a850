"""The best any early-stopping rule can do in the vote evaluation: an oracle that
knows the true answer distribution (A 0.6, B 0.3, C 0.1) and stops at the first
count state where P(the 15-sample winner is the current leader) reaches a
threshold. Exact dynamic programming over count states; ties in the final vote
count as disagreement (conservative).

    python3 bench/vote_oracle.py
"""

from math import comb

P = (0.6, 0.3, 0.1)
N = 15


def leader_keeps(counts: tuple[int, int, int], leader: int) -> float:
    """P(after all N samples the leader is the sole winner | counts)."""
    remaining = N - sum(counts)
    total = 0.0
    for x in range(remaining + 1):
        for y in range(remaining - x + 1):
            z = remaining - x - y
            chance = comb(remaining, x) * comb(remaining - x, y) * P[0] ** x * P[1] ** y * P[2] ** z
            final = (counts[0] + x, counts[1] + y, counts[2] + z)
            if [i for i in range(3) if final[i] == max(final)] == [leader]:
                total += chance
    return total


def oracle(threshold: float) -> tuple[float, float]:
    """(share of calls saved, agreement with the full vote) for one threshold."""
    mass = {(0, 0, 0): 1.0}
    calls = agree = 0.0
    for k in range(N + 1):
        following: dict[tuple[int, int, int], float] = {}
        for counts, m in mass.items():
            leader = max(range(3), key=lambda i: (counts[i], -i))
            keeps = leader_keeps(counts, leader) if k > 0 else 0.0
            if k == N or keeps >= threshold:
                calls += m * k
                agree += m * (keeps if k < N else 1.0)
                continue
            for i in range(3):
                state = tuple(c + (j == i) for j, c in enumerate(counts))
                following[state] = following.get(state, 0.0) + m * P[i]
        mass = following
    return 1 - calls / N, agree


if __name__ == "__main__":
    print("| oracle threshold | fewer calls | agreement with n=15 (at least) |")
    print("| --- | --- | --- |")
    for threshold in (0.95, 0.97, 0.975, 0.99):
        saved, agree = oracle(threshold)
        print(f"| {threshold} | {100 * saved:.1f}% | {100 * agree:.1f}% |")
