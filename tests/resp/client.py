"""redis-py against a Lattice node's RESP listener (run by tests/tests/resp.rs).

Usage: python3 client.py HOST PORT TOKEN

Covers: AUTH with and without a user name, pipelining (many commands in
one round trip, answered in order), strings, counters, sets and hashes in
RESP2 and RESP3 (protocol=3: maps and sets arrive as dict and set), the
errors Redis clients match on (WRONGTYPE, unknown command, bad password).
Exits non-zero with a message on the first failure.
"""

import sys

import redis


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    major = int(redis.__version__.split(".")[0])
    if major < 5:
        sys.exit(
            f"redis-py {redis.__version__} has no RESP3 (protocol=3): "
            "install redis>=5 (python3 -m pip install 'redis>=5')"
        )

    r = redis.Redis(host=host, port=port, password=token, decode_responses=True)
    check(r.ping() is True, "PING")
    check(r.set("py:s", "hello") is True, "SET")
    check(r.get("py:s") == "hello", "GET after SET")
    check(r.get("py:absent") is None, "GET of an absent key is None")

    # A pipeline of 300 commands in one round trip: answers come in order,
    # and reads see the writes sent before them on the connection.
    p = r.pipeline(transaction=False)
    for i in range(100):
        p.set(f"py:k{i}", str(i))
        p.incr("py:counter")
        p.get(f"py:k{i}")
    out = p.execute()
    check(len(out) == 300, f"300 answers, got {len(out)}")
    for i in range(100):
        check(out[3 * i] is True, f"SET {i} in the pipeline")
        check(out[3 * i + 1] == i + 1, f"INCR {i} answers {i + 1}, got {out[3 * i + 1]}")
        check(out[3 * i + 2] == str(i), f"GET {i} sees its SET, got {out[3 * i + 2]}")
    check(r.decrby("py:counter", 50) == 50, "DECRBY")
    keys = set(r.scan_iter(match="py:k*", count=20))
    check(keys == {f"py:k{i}" for i in range(100)}, f"SCAN MATCH py:k* found {len(keys)} keys")
    check(r.mget(["py:k1", "py:k2", "py:none"]) == ["1", "2", None], "MGET")
    check(r.mset({"py:m1": "a", "py:m2": "b"}) is True, "MSET")
    check(r.exists("py:m1", "py:m2", "py:none") == 2, "EXISTS counts")

    check(r.sadd("py:set", "a", "b", "c") == 3, "SADD new members")
    check(r.sadd("py:set", "c", "d") == 1, "SADD counts only new members")
    check(r.smembers("py:set") == {"a", "b", "c", "d"}, "SMEMBERS")
    check(r.sismember("py:set", "a") in (1, True), "SISMEMBER")
    check(r.srem("py:set", "a", "zz") == 1, "SREM")
    check(r.scard("py:set") == 3, "SCARD")

    check(r.hset("py:h", mapping={"f1": "v1", "f2": "v2"}) == 2, "HSET mapping")
    check(r.hget("py:h", "f1") == "v1", "HGET")
    check(r.hincrby("py:h", "n", 7) == 7, "HINCRBY")
    check(r.hgetall("py:h") == {"f1": "v1", "f2": "v2", "n": "7"}, f"HGETALL {r.hgetall('py:h')}")
    check(r.hdel("py:h", "f1", "nope") == 1, "HDEL")
    check(r.type("py:h") == "hash" and r.type("py:set") == "set", "TYPE")
    check(r.delete("py:m1", "py:none") == 1, "DEL counts")

    try:
        r.sadd("py:s", "x")
        check(False, "SADD on a string key must fail")
    except redis.ResponseError as e:
        check(str(e).startswith("WRONGTYPE"), f"WRONGTYPE, got {e}")
    try:
        r.execute_command("FLUSHALL")
        check(False, "FLUSHALL must be refused")
    except redis.ResponseError as e:
        check("unknown command" in str(e) and "FLUSHALL" in str(e), f"unknown command, got {e}")

    # AUTH <user> <token>: the user name is accepted, the token checked.
    u = redis.Redis(host=host, port=port, username="default", password=token, decode_responses=True)
    check(u.get("py:s") == "hello", "AUTH with a user name")
    try:
        redis.Redis(host=host, port=port, password="wrong-token-wrong-token").ping()
        check(False, "a wrong token must be refused")
    except redis.AuthenticationError:
        pass

    # RESP3: HELLO 3 AUTH default TOKEN on connect; maps and sets arrive typed.
    r3 = redis.Redis(host=host, port=port, password=token, protocol=3, decode_responses=True)
    check(r3.ping() is True, "PING over RESP3")
    check("resp=3" in r3.execute_command("CLIENT", "INFO"), "the connection speaks RESP3")
    check(r3.hgetall("py:h") == {"f2": "v2", "n": "7"}, f"HGETALL over RESP3: {r3.hgetall('py:h')}")
    check(r3.smembers("py:set") == {"b", "c", "d"}, "SMEMBERS over RESP3")
    check(r3.get("py:absent") is None, "a RESP3 null")
    p3 = r3.pipeline(transaction=False)
    for i in range(50):
        p3.incr("py:c3")
    p3.get("py:c3")
    out = p3.execute()
    check(out[:50] == list(range(1, 51)) and out[50] == "50", f"RESP3 pipeline: {out[-3:]}")
    print("redis-py ok:", redis.__version__)


if __name__ == "__main__":
    main()
