"""A mesoshttp framework that a Rust test drives line by line: it launches
the tasks given, prints every status update it gets as one JSON line, and
takes commands on stdin. Used by tests/agent_partition.rs.

Usage: driven_framework.py MASTER_URL NAME TIMEOUT PARTITION_AWARE(0|1) TASKS_JSON
  TASKS_JSON: [[task_id, shell command], ...], launched on the first offer.
Prints {"subscribed": framework_id}, then {"update": {"task": .., "state": ..,
"reason": .., "message": ..}} per update (acknowledged).
Commands: "kill TASK", "reconcile TASK", "launch TASK COMMAND..." (on the
next offer), "quit".
"""

import json
import sys
import threading

import requests
from mesoshttp.client import MesosClient

URL, NAME = sys.argv[1], sys.argv[2]
TIMEOUT = float(sys.argv[3])
AWARE = sys.argv[4] == "1"
TASKS = json.loads(sys.argv[5])
out_lock = threading.Lock()
state = {"driver": None, "agent_id": None, "launched": False, "pending": []}
done = threading.Event()


def say(value):
    with out_lock:
        print(json.dumps(value), flush=True)


def task(task_id, agent_id, command):
    return {
        "name": task_id,
        "task_id": {"value": task_id},
        "agent_id": agent_id,
        "resources": [
            {"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.05}},
            {"name": "mem", "type": "SCALAR", "scalar": {"value": 32}},
        ],
        "command": {"value": command},
    }


def on_subscribed(driver):
    state["driver"] = driver
    say({"subscribed": driver.frameworkId})


def on_offers(offers):
    for offer in offers:
        if state["launched"] and not state["pending"]:
            offer.decline({"filters": {"refuse_seconds": 0.2}})
            continue
        agent_id = offer.get_offer()["agent_id"]
        state["agent_id"] = agent_id
        tasks, state["pending"] = (state["pending"] if state["launched"] else TASKS), []
        state["launched"] = True
        offer.accept([task(t, agent_id, c) for t, c in tasks])


def on_update(update):
    status = update["status"]
    say({"update": {"task": status["task_id"]["value"], "state": status["state"],
                    "reason": status.get("reason", ""), "message": status.get("message", "")}})


def commands():
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        driver = state["driver"]
        if words[0] == "quit":
            break
        if words[0] == "launch":
            state["pending"].append((words[1], " ".join(words[2:])))
        elif words[0] == "kill":
            driver.kill(state["agent_id"]["value"], words[1])
        elif words[0] == "reconcile":
            requests.post(driver.mesos_url + "/api/v1/scheduler", json={
                "type": "RECONCILE", "framework_id": {"value": driver.frameworkId},
                "reconcile": {"tasks": [{"task_id": {"value": words[1]}}]}},
                headers={"Mesos-Stream-Id": driver.streamId})
    done.set()


def main():
    # Reconnects (after mesoshttp's 10 s) with its framework id when the master restarts.
    client = MesosClient(mesos_urls=[URL], frameworkName=NAME, max_reconnect=10)
    if AWARE:
        client.add_capability("PARTITION_AWARE")
    client.on(MesosClient.SUBSCRIBED, on_subscribed)
    client.on(MesosClient.OFFERS, on_offers)
    client.on(MesosClient.UPDATE, on_update)
    threading.Thread(target=client.register, daemon=True).start()
    threading.Thread(target=commands, daemon=True).start()
    done.wait(TIMEOUT)
    try:
        if state["driver"] is not None:
            state["driver"].tearDown()
    finally:
        client.stop = True
        client.disconnect_framework()
    return 0


if __name__ == "__main__":
    sys.exit(main())
