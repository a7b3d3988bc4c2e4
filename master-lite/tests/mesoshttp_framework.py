"""A framework written with mesoshttp 0.4.2 (a real Mesos client library from
PyPI), run against a Butte master by tests/mesoshttp.rs.

Usage: mesoshttp_framework.py MASTER_URL [TIMEOUT_SECONDS]

Walks one story and prints a line per step; exits 0 only if every step was
seen, 1 with the reason on the first failure or when time runs out.

mesoshttp reads the RecordIO stream line by line, so it hands over each event
only when the next one arrives: the master under test sends heartbeats every
second to keep this test fast (Mesos sends them every 15 s).
"""

import logging
import queue
import sys
import threading
import time

import requests
from mesoshttp.client import MesosClient

URL = sys.argv[1]
TIMEOUT = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
# With a principal and secret: HTTP Basic on every call, as mesoshttp sends
# it (requests_auth), and the principal in framework_info.
PRINCIPAL = sys.argv[3] if len(sys.argv) > 4 else None
AUTH = requests.auth.HTTPBasicAuth(PRINCIPAL, sys.argv[4]) if PRINCIPAL else None
DEADLINE = time.monotonic() + TIMEOUT
events = queue.Queue()


def step(message):
    print(message, flush=True)


def fail(message):
    print("FAILED: " + message, flush=True)
    sys.exit(1)


def next_event(kinds, within=None):
    """The next event whose kind is in `kinds`; other kinds are dropped."""
    limit = DEADLINE if within is None else min(DEADLINE, time.monotonic() + within)
    while True:
        left = limit - time.monotonic()
        if left <= 0:
            return None
        try:
            kind, payload = events.get(timeout=left)
        except queue.Empty:
            return None
        if kind == "ERROR":
            fail("the master sent ERROR: %s" % payload)
        if kind in kinds:
            return kind, payload


def expect(kinds, what, within=None):
    got = next_event(kinds, within)
    if got is None:
        fail("no %s within the time allowed" % what)
    return got[1]


def resources(offer, name):
    for r in offer.get("resources", []):
        if r["name"] == name and "scalar" in r:
            return r["scalar"]["value"]
    return 0.0


def command_task(task_id, agent_id):
    return {
        "name": task_id,
        "task_id": {"value": task_id},
        "agent_id": agent_id,
        "resources": [
            {"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}},
            {"name": "mem", "type": "SCALAR", "scalar": {"value": 32}},
        ],
        "command": {"value": "echo hello"},
    }


def raw_call(driver, body):
    """A call mesoshttp has no method for, sent the way its driver sends calls."""
    body = dict(body, framework_id={"value": driver.frameworkId})
    answer = requests.post(
        driver.mesos_url + "/api/v1/scheduler",
        json=body,
        headers={"Accept": "application/json", "Mesos-Stream-Id": driver.streamId},
        auth=AUTH,
    )
    if answer.status_code != 202:
        fail("%s answered %d: %s" % (body["type"], answer.status_code, answer.text))


def main():
    logging.basicConfig(level=logging.WARNING)
    client = MesosClient(mesos_urls=[URL], frameworkName="mesoshttp-test", max_reconnect=1)
    client.set_failover_timeout(60)
    if PRINCIPAL:
        client.principal = PRINCIPAL
        client.requests_auth = AUTH
    client.on(MesosClient.SUBSCRIBED, lambda driver: events.put(("SUBSCRIBED", driver)))
    client.on(MesosClient.OFFERS, lambda offers: events.put(("OFFERS", offers)))
    client.on(MesosClient.UPDATE, lambda update: events.put(("UPDATE", update)))
    client.on(MesosClient.ERROR, lambda message: events.put(("ERROR", message)))
    client.on(MesosClient.RESCIND, lambda rescind: events.put(("RESCIND", rescind)))
    threading.Thread(target=client.register, daemon=True).start()

    try:
        driver = expect(["SUBSCRIBED"], "SUBSCRIBED")
        if not client.frameworkId:
            fail("SUBSCRIBED carried no framework id")
        step("1 subscribed as %s (stream %s)" % (client.frameworkId, driver.streamId))

        offers = expect(["OFFERS"], "OFFERS")
        usable = [o for o in offers if resources(o.get_offer(), "cpus") > 0 and resources(o.get_offer(), "mem") > 0]
        if not usable:
            fail("no offer with cpus and mem in %s" % [o.get_offer() for o in offers])
        chosen = usable[0]
        agent_id = chosen.get_offer()["agent_id"]
        step("2 offer %s from agent %s: cpus %.1f mem %.0f" % (
            chosen.get_offer()["id"]["value"], agent_id["value"],
            resources(chosen.get_offer(), "cpus"), resources(chosen.get_offer(), "mem")))

        chosen.accept([command_task("t1", agent_id), command_task("t2", agent_id)],
                      options={"filters": {"refuse_seconds": 1}})
        for other in offers:
            if other is not chosen:
                other.decline(options={"filters": {"refuse_seconds": 1}})
        step("3 launched t1 and t2")

        states = {"t1": [], "t2": []}
        while not all(s and s[-1] == "TASK_FINISHED" for s in states.values()):
            update = expect(["UPDATE"], "updates for t1 and t2")
            status = update["status"]
            task = status["task_id"]["value"]
            if task in states:
                states[task].append(status["state"])
            if status["state"] in ("TASK_ERROR", "TASK_FAILED", "TASK_LOST", "TASK_DROPPED"):
                fail("task %s: %s %s" % (task, status["state"], status.get("message", "")))
        for task, seen in states.items():
            if "TASK_RUNNING" not in seen:
                fail("task %s never reported TASK_RUNNING: %s" % (task, seen))
        step("4 both tasks finished (acknowledged by mesoshttp): %s" % states)

        offers = expect(["OFFERS"], "an offer after the tasks finished")
        for offer in offers:
            offer.decline(options={"filters": {"refuse_seconds": 30}})
        raw_call(driver, {"type": "SUPPRESS"})
        if next_event(["OFFERS"], within=3) is not None:
            fail("an offer arrived while suppressed and filtered")
        step("5 declined with a 30 s filter and suppressed: no offers for 3 s")

        driver.revive()
        if next_event(["OFFERS"], within=10) is None:
            fail("no offer within 10 s of REVIVE (revive clears filters)")
        step("6 revived: offered again despite the 30 s filter")

        driver.tearDown()
        step("7 torn down")
    finally:
        client.stop = True
        client.disconnect_framework()
    return 0


if __name__ == "__main__":
    sys.exit(main())
