"""A mesoshttp framework for tests/agent_recovery.rs: its tasks must live
through the launcher's death and the agent's kill -9, and every end must
reach it as it really was. The test drives the gaps; the framework prints
one JSON line per phase and exits 0 only if what it saw held.

Usage: recovery_framework.py MASTER_URL MODE TIMEOUT
Tasks (each waits for a file `go` in its sandbox, which the test makes):
  long     sleep 600, killed by the framework at the end (TASK_KILLED)
  finish   exits 0 once told                      (TASK_FINISHED)
  fail     exits 7 once told                      (TASK_FAILED, status 7)
  killed   its processes are killed -9 by the test (TASK_FAILED, signal 9)
  fenced   binds 31001 (outside its range) and 31000 (results in `bind`),
           then, told again (`go2`), once more (`bind2`), and exits 0
  after    launched once `finish` ended, after the launcher was killed
Phases: "running" (all five run; the test kills the launcher and tells
`finish`), "agent" (`after` ended; the test kills the agent, tells the
rest, kills `killed`, starts the agent again), then the results.
"""

import json
import os
import queue
import sys
import threading
import time

from mesoshttp.client import MesosClient

URL = sys.argv[1]
TIMEOUT = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
DEADLINE = time.monotonic() + TIMEOUT
TERMINAL = ("TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_ERROR", "TASK_LOST", "TASK_DROPPED",
            "TASK_GONE", "TASK_GONE_BY_OPERATOR", "TASK_UNREACHABLE")
events = queue.Queue()

WAIT = "while [ ! -e $MESOS_SANDBOX/go ]; do sleep 0.1; done; "
BIND = """
import errno, socket, sys
with open(sys.argv[1], "w") as out:
    for port in (31001, 31000):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            result = "ok"
        except OSError as e:
            result = errno.errorcode.get(e.errno, str(e.errno))
        out.write("%d %s\\n" % (port, result))
        s.close()
"""


def fail(message):
    print("FAILED: " + message, flush=True)
    sys.exit(1)


def next_event(kind):
    while True:
        left = DEADLINE - time.monotonic()
        try:
            got, payload = events.get(timeout=max(left, 0.01))
        except queue.Empty:
            fail("timed out waiting for %s" % kind)
        if got == "ERROR":
            fail("master sent ERROR: %s" % payload)
        if got == kind:
            return payload
        if got == "OFFERS":
            for offer in payload:
                offer.decline()


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


def main():
    client = MesosClient(mesos_urls=[URL], frameworkName="recovery", max_reconnect=1)
    client.on(MesosClient.SUBSCRIBED, lambda driver: events.put(("SUBSCRIBED", driver)))
    client.on(MesosClient.OFFERS, lambda offers: events.put(("OFFERS", offers)))
    client.on(MesosClient.UPDATE, lambda update: events.put(("UPDATE", update)))
    client.on(MesosClient.ERROR, lambda message: events.put(("ERROR", message)))
    threading.Thread(target=client.register, daemon=True).start()
    try:
        driver = next_event("SUBSCRIBED")
        offer = next_event("OFFERS")[0]
        agent_id = offer.get_offer()["agent_id"]
        fenced = task("fenced", agent_id, WAIT + 'python3 -c "$BIND" bind; '
                      'while [ ! -e $MESOS_SANDBOX/go2 ]; do sleep 0.1; done; exec python3 -c "$BIND" bind2')
        fenced["resources"].append({"name": "ports", "type": "RANGES",
                                    "ranges": {"range": [{"begin": 31000, "end": 31000}]}})
        fenced["command"]["environment"] = {"variables": [{"name": "BIND", "value": BIND}]}
        tasks = [
            task("long", agent_id, "sleep 600"),
            task("finish", agent_id, WAIT + "exit 0"),
            task("fail", agent_id, WAIT + "exit 7"),
            task("killed", agent_id, "sleep 600"),
            fenced,
        ]
        offer.accept(tasks)
        seen = []  # (task, state, message, reason) in order of arrival
        running = set()
        final = {}
        phase = "running"
        while True:
            update = next_event("UPDATE")["status"]
            task_id, state = update["task_id"]["value"], update["state"]
            seen.append([task_id, state, update.get("message", ""), update.get("reason", "")])
            if state == "TASK_RUNNING":
                running.add(task_id)
            if state in TERMINAL:
                final.setdefault(task_id, []).append([state, update.get("message", ""), update.get("reason", "")])
            if phase == "running" and running >= {t["task_id"]["value"] for t in tasks}:
                print(json.dumps({"phase": "running"}), flush=True)
                phase = "after"
            if phase == "after" and "finish" in final:
                # The launcher was killed: a launch now needs the new one.
                while True:
                    offers = next_event("OFFERS")
                    if offers:
                        break
                offers[0].accept([task("after", agent_id, "true")])
                for extra in offers[1:]:
                    extra.decline()
                phase = "after-launched"
            if phase == "after-launched" and "after" in final:
                print(json.dumps({"phase": "agent"}), flush=True)
                phase = "gap"
            if phase == "gap" and all(t in final for t in ("fail", "killed", "fenced")):
                driver.kill(agent_id["value"], "long")
                phase = "kill"
            if phase == "kill" and "long" in final:
                break
        # A little longer, to catch a repeated terminal update.
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                got, payload = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if got == "UPDATE":
                status = payload["status"]
                if status["state"] in TERMINAL:
                    final.setdefault(status["task_id"]["value"], []).append(
                        [status["state"], status.get("message", ""), status.get("reason", "")])
        print(json.dumps({"final": final, "seen": seen}), flush=True)
        driver.tearDown()
    finally:
        client.stop = True
        client.disconnect_framework()
    return 0


if __name__ == "__main__":
    sys.exit(main())
