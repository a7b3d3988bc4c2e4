"""A mesoshttp 0.4.2 framework that runs real tasks on a Butte agent, driven
by tests/agent_e2e.rs. Prints one JSON line per finished check and exits 0
only if every expectation held.

Usage: agent_framework.py MASTER_URL MODE [TIMEOUT]
  MODE e2e:   50 `echo hello-$i` tasks, a memory hog, `exit 3`, a killed
              `sleep 600`, and an `inspect` task that records what it sees.
  MODE churn: 200 `sleep 600` tasks launched and killed.
"""

import json
import queue
import requests
import sys
import threading
import time

from mesoshttp.client import MesosClient

URL, MODE = sys.argv[1], sys.argv[2]
TIMEOUT = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
DEADLINE = time.monotonic() + TIMEOUT
events = queue.Queue()

INSPECT = ("cat /proc/self/cgroup > $MESOS_SANDBOX/cgroup; ps -e -o pid=,comm= > $MESOS_SANDBOX/ps; "
           "hostname > $MESOS_SANDBOX/hostname; env | grep ^MESOS_ | sort > $MESOS_SANDBOX/env")


def fail(message):
    print("FAILED: " + message, flush=True)
    sys.exit(1)


def next_event(kind):
    while True:
        left = DEADLINE - time.monotonic()
        if left <= 0:
            fail("timed out waiting for %s" % kind)
        try:
            got, payload = events.get(timeout=left)
        except queue.Empty:
            fail("timed out waiting for %s" % kind)
        if got == "ERROR":
            fail("master sent ERROR: %s" % payload)
        if got == kind:
            return payload


BIND_CHECK = """
import errno, socket
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    for port in (31000, 31001, 8080, 0):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            result = "ok"
        except OSError as e:
            result = errno.errorcode.get(e.errno, str(e.errno))
        print(family.name, port, result)
        s.close()
"""


def ports_task(task_id, agent_id):
    t = task(task_id, agent_id, 'exec python3 -c "$BIND_CHECK"')
    t["resources"].append({"name": "ports", "type": "RANGES", "ranges": {"range": [{"begin": 31000, "end": 31000}]}})
    t["command"]["environment"] = {"variables": [{"name": "BIND_CHECK", "value": BIND_CHECK}]}
    return t


def task(task_id, agent_id, command, cpus=0.05, mem=32):
    return {
        "name": task_id,
        "task_id": {"value": task_id},
        "agent_id": agent_id,
        "resources": [
            {"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}},
            {"name": "mem", "type": "SCALAR", "scalar": {"value": mem}},
        ],
        "command": {"value": command},
    }


def main():
    client = MesosClient(mesos_urls=[URL], frameworkName="agent-" + MODE, max_reconnect=1)
    client.on(MesosClient.SUBSCRIBED, lambda driver: events.put(("SUBSCRIBED", driver)))
    client.on(MesosClient.OFFERS, lambda offers: events.put(("OFFERS", offers)))
    client.on(MesosClient.UPDATE, lambda update: events.put(("UPDATE", update)))
    client.on(MesosClient.ERROR, lambda message: events.put(("ERROR", message)))
    threading.Thread(target=client.register, daemon=True).start()
    try:
        driver = next_event("SUBSCRIBED")
        offers = next_event("OFFERS")
        offer = offers[0]
        agent_id = offer.get_offer()["agent_id"]
        if MODE == "e2e":
            tasks = [task("echo-%d" % i, agent_id, "echo hello-%d" % i) for i in range(50)]
            tasks.append(task("memhog", agent_id, "exec dd if=/dev/zero of=/dev/null bs=256M count=1", mem=32))
            tasks.append(task("exit3", agent_id, "exit 3"))
            tasks.append(task("sleeper", agent_id, "sleep 600"))
            tasks.append(task("inspect", agent_id, INSPECT))
            tasks.append(ports_task("ports", agent_id))
            tasks.append(task("devices", agent_id,
                              "cat /dev/null && echo null=ok; cat /dev/butte-kt-fake 2>&1 | head -1; true"))
            group = [task("group-%s" % g, agent_id, "readlink /proc/self/ns/pid > ns; sleep 1") for g in "abc"]
        else:
            tasks = [task("churn-%d" % i, agent_id, "sleep 600", cpus=0.01, mem=4) for i in range(200)]
            group = []
        operations = [{"type": "LAUNCH", "launch": {"task_infos": tasks}}]
        if group:
            # mesoshttp has no LAUNCH_GROUP: send the ACCEPT the way its driver sends calls.
            operations.append({"type": "LAUNCH_GROUP", "launch_group": {
                "executor": {"type": "DEFAULT", "executor_id": {"value": "grp-exec"},
                             "framework_id": {"value": driver.frameworkId},
                             "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}},
                                           {"name": "mem", "type": "SCALAR", "scalar": {"value": 32}}]},
                "task_group": {"tasks": group}}})
        answer = requests.post(driver.mesos_url + "/api/v1/scheduler", json={
            "type": "ACCEPT", "framework_id": {"value": driver.frameworkId},
            "accept": {"offer_ids": [offer.get_offer()["id"]], "operations": operations}},
            headers={"Mesos-Stream-Id": driver.streamId})
        if answer.status_code != 202:
            fail("ACCEPT answered %d: %s" % (answer.status_code, answer.text))
        tasks = tasks + group
        print(json.dumps({"launched": len(tasks)}), flush=True)

        final = {}
        kill_sent = {}
        while len(final) < len(tasks):
            status = next_event("UPDATE")["status"]
            task_id, state = status["task_id"]["value"], status["state"]
            if state == "TASK_RUNNING" and (task_id == "sleeper" or MODE == "churn") and task_id not in kill_sent:
                kill_sent[task_id] = time.monotonic()
                driver.kill(agent_id["value"], task_id)
            if state in ("TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_ERROR", "TASK_LOST", "TASK_DROPPED"):
                final[task_id] = {"state": state, "message": status.get("message", ""), "reason": status.get("reason", "")}
                if task_id in kill_sent:
                    final[task_id]["kill_seconds"] = round(time.monotonic() - kill_sent[task_id], 3)
        print(json.dumps({"final": final}), flush=True)

        problems = []
        if MODE == "e2e":
            for i in range(50):
                if final["echo-%d" % i]["state"] != "TASK_FINISHED":
                    problems.append("echo-%d: %s" % (i, final["echo-%d" % i]))
            if final["memhog"]["state"] != "TASK_FAILED" or final["memhog"]["reason"] != "REASON_CONTAINER_LIMITATION_MEMORY":
                problems.append("memhog: %s" % final["memhog"])
            if final["exit3"]["state"] != "TASK_FAILED" or "3" not in final["exit3"]["message"]:
                problems.append("exit3: %s" % final["exit3"])
            if final["sleeper"]["state"] != "TASK_KILLED" or final["sleeper"]["kill_seconds"] > 3 + 2:
                problems.append("sleeper: %s" % final["sleeper"])
            if final["devices"]["state"] != "TASK_FINISHED":
                problems.append("devices: %s" % final["devices"])
            if final["ports"]["state"] != "TASK_FINISHED":
                problems.append("ports: %s" % final["ports"])
            if final["inspect"]["state"] != "TASK_FINISHED":
                problems.append("inspect: %s" % final["inspect"])
            for g in "abc":
                if final["group-" + g]["state"] != "TASK_FINISHED":
                    problems.append("group-%s: %s" % (g, final["group-" + g]))
        else:
            for task_id, result in final.items():
                if result["state"] != "TASK_KILLED":
                    problems.append("%s: %s" % (task_id, result))
        if problems:
            fail("; ".join(problems[:10]))
        driver.tearDown()
        print(json.dumps({"ok": True}), flush=True)
    finally:
        client.stop = True
        client.disconnect_framework()
    return 0


if __name__ == "__main__":
    sys.exit(main())
