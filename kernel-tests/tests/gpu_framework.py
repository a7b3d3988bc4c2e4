"""A mesoshttp 0.4.2 framework that asks a Butte agent with simulated GPUs
for `gpus`, driven by tests/gpu_e2e.rs.

It prints one JSON line per fact it saw (offers, task statuses with their
labels); the Rust test makes the assertions. Where the test must act on the
node (rewrite the sim file, read /metrics) the framework prints
{"wait": WHAT, ...} and blocks until the test answers with one line on stdin.
It exits 0 only if the protocol went as expected (offers came, tasks ran and
ended as asked) within TIMEOUT seconds.

Usage: gpu_framework.py MASTER_URL MODE TIMEOUT [DEVICE_DIR]
  MODE fenced: a framework without GPU_RESOURCES watches offers for 3 s;
               then a GPU_RESOURCES one reports its first offer and runs a
               gpus:2 task that tries to open every node of DEVICE_DIR and
               records its GPU environment in its sandbox.
  MODE quads:  two gpus:4 tasks from one offer; the gpus offered while both
               run; a third gpus:4 task from the first offer with 4 after one
               ended.
  MODE faulty: holds an offer with 8 gpus and waits for the test to fault
               GPU 3; reports the rescind and the first offer with 7, from
               which it runs a gpus:7 task.
  MODE memory: a gpus:1 `sleep 30`; waits while the test checks /metrics,
               then kills it.
"""

import json
import queue
import sys
import threading
import time

import requests
from mesoshttp.client import MesosClient

URL, MODE = sys.argv[1], sys.argv[2]
TIMEOUT = float(sys.argv[3])
DEADLINE = time.monotonic() + TIMEOUT
FINAL = ("TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_ERROR", "TASK_LOST", "TASK_DROPPED")

# Run inside the task: one line per node, `NAME ok` or `NAME ERRNO`.
OPEN_CHECK = """
import errno, os
d = os.environ["GPU_DEV_DIR"]
sandbox = os.environ["MESOS_SANDBOX"]
with open(os.path.join(sandbox, "opens"), "w") as out:
    for name in ["nvidia%d" % i for i in range(8)] + ["nvidiactl"]:
        try:
            os.close(os.open(os.path.join(d, name), os.O_RDWR))
            result = "ok"
        except OSError as e:
            result = errno.errorcode.get(e.errno, str(e.errno))
        out.write("%s %s\\n" % (name, result))
with open(os.path.join(sandbox, "gpu_env"), "w") as out:
    for name in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "BUTTE_GPU_INDICES"):
        if name in os.environ:
            out.write("%s=%s\\n" % (name, os.environ[name]))
"""


def report(**fact):
    print(json.dumps(fact), flush=True)


def fail(message):
    print("FAILED: " + message, flush=True)
    sys.exit(1)


def left():
    remaining = DEADLINE - time.monotonic()
    if remaining <= 0:
        fail("timed out after %.0f s" % TIMEOUT)
    return remaining


def wait_for_test(what, **details):
    """Lets the test act on the node; its answer is one line on stdin."""
    report(wait=what, **details)
    answer = sys.stdin.readline()
    if not answer:
        fail("the test went away while we waited for %s" % what)
    return answer.strip()


class Framework:
    """One mesoshttp client and the events it delivered, in order."""

    def __init__(self, name, gpu_aware):
        self.events = queue.Queue()
        self.client = MesosClient(mesos_urls=[URL], frameworkName=name, max_reconnect=1)
        if gpu_aware:
            self.client.add_capability("GPU_RESOURCES")
        for kind in (MesosClient.SUBSCRIBED, MesosClient.OFFERS, MesosClient.UPDATE,
                     MesosClient.ERROR, MesosClient.RESCIND):
            self.client.on(kind, lambda payload, kind=kind: self.events.put((kind, payload)))
        threading.Thread(target=self.client.register, daemon=True).start()
        self.driver = self.next(MesosClient.SUBSCRIBED, left())

    def next(self, kind, within):
        """The next event of `kind` within `within` seconds, or None; others are dropped
        (offers declined)."""
        until = time.monotonic() + min(within, left())
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return None
            try:
                got, payload = self.events.get(timeout=remaining)
            except queue.Empty:
                return None
            if got == MesosClient.ERROR:
                fail("master sent ERROR: %s" % payload)
            if got == kind:
                return payload
            if got == MesosClient.OFFERS:
                self.decline(payload)

    def event(self, within):
        """Any next event (kind, payload) within `within` seconds, or (None, None)."""
        try:
            got, payload = self.events.get(timeout=min(within, left()))
        except queue.Empty:
            return None, None
        if got == MesosClient.ERROR:
            fail("master sent ERROR: %s" % payload)
        return got, payload

    def decline(self, offers, refuse_seconds=0.5):
        for offer in offers:
            offer.decline({"filters": {"refuse_seconds": refuse_seconds}})

    def offer_where(self, wanted, what):
        """The first offer satisfying `wanted`; the others are declined."""
        while True:
            offers = self.next(MesosClient.OFFERS, left())
            if offers is None:
                fail("no offer with %s" % what)
            for i, offer in enumerate(offers):
                if wanted(offer.get_offer()):
                    self.decline(offers[:i] + offers[i + 1:])
                    return offer
            self.decline(offers)

    def accept(self, offer, tasks):
        answer = requests.post(self.driver.mesos_url + "/api/v1/scheduler", json={
            "type": "ACCEPT", "framework_id": {"value": self.driver.frameworkId},
            "accept": {"offer_ids": [offer.get_offer()["id"]],
                       "operations": [{"type": "LAUNCH", "launch": {"task_infos": tasks}}],
                       "filters": {"refuse_seconds": 0.2}}},
            headers={"Mesos-Stream-Id": self.driver.streamId})
        if answer.status_code != 202:
            fail("ACCEPT answered %d: %s" % (answer.status_code, answer.text))
        report(launched=[t["task_id"]["value"] for t in tasks])

    def stop(self):
        try:
            self.driver.tearDown()
        finally:
            self.client.stop = True
            self.client.disconnect_framework()


def scalar(offer, name):
    return sum(r["scalar"]["value"] for r in offer.get("resources", []) if r["name"] == name)


def attributes(offer):
    found = {}
    for a in offer.get("attributes", []):
        if a["type"] == "SCALAR":
            found[a["name"]] = a["scalar"]["value"]
        elif a["type"] == "TEXT":
            found[a["name"]] = a["text"]["value"]
    return found


def task(task_id, agent_id, command, gpus, cpus=0.1, mem=64, env=None):
    t = {
        "name": task_id,
        "task_id": {"value": task_id},
        "agent_id": agent_id,
        "resources": [
            {"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}},
            {"name": "mem", "type": "SCALAR", "scalar": {"value": mem}},
            {"name": "gpus", "type": "SCALAR", "scalar": {"value": gpus}},
        ],
        "command": {"value": command},
    }
    if env:
        t["command"]["environment"] = {"variables": [{"name": k, "value": v} for k, v in env.items()]}
    return t


def status_fact(status):
    labels = {label["key"]: label.get("value", "")
              for label in status.get("labels", {}).get("labels", [])}
    return {"task": status["task_id"]["value"], "state": status["state"],
            "message": status.get("message", ""), "labels": labels, "at": time.monotonic()}


def status(framework, within):
    """The next status update as a reported fact, or None."""
    update = framework.next(MesosClient.UPDATE, within)
    if update is None:
        return None
    fact = status_fact(update["status"])
    report(status=fact)
    return fact


def until_final(framework, task_ids):
    """Statuses until every task in `task_ids` has ended; their final states."""
    final = {}
    while set(task_ids) - set(final):
        fact = status(framework, left())
        if fact is None:
            fail("tasks %s did not end" % sorted(set(task_ids) - set(final)))
        if fact["state"] in FINAL:
            final[fact["task"]] = fact["state"]
    return final


def expect_finished(final):
    problems = {t: s for t, s in final.items() if s != "TASK_FINISHED"}
    if problems:
        fail("tasks did not finish: %s" % problems)


def run_fenced(device_dir):
    unaware = Framework("gpu-unaware", gpu_aware=False)
    watched_until = time.monotonic() + 3.0
    offers = []
    while time.monotonic() < watched_until:
        got, payload = unaware.event(watched_until - time.monotonic())
        if got == MesosClient.OFFERS:
            offers += [{"gpus": scalar(o.get_offer(), "gpus"),
                        "resources": [r["name"] for r in o.get_offer().get("resources", [])]}
                       for o in payload]
            unaware.decline(payload)
    report(unaware_offers=offers)
    unaware.stop()

    aware = Framework("gpu-aware", gpu_aware=True)
    offer = aware.offer_where(lambda o: True, "anything")
    details = offer.get_offer()
    report(offer={"gpus": scalar(details, "gpus"), "attributes": attributes(details)})
    if scalar(details, "gpus") < 2:
        fail("the first offer has %s gpus, so no gpus:2 task can run" % scalar(details, "gpus"))
    aware.accept(offer, [task("fenced", details["agent_id"], 'python3 -c "$OPEN_CHECK"', gpus=2,
                              env={"OPEN_CHECK": OPEN_CHECK, "GPU_DEV_DIR": device_dir})])
    expect_finished(until_final(aware, ["fenced"]))
    aware.stop()


def run_quads():
    fw = Framework("gpu-quads", gpu_aware=True)
    offer = fw.offer_where(lambda o: scalar(o, "gpus") >= 8, "8 gpus")
    agent_id = offer.get_offer()["agent_id"]
    fw.accept(offer, [task(t, agent_id, "sleep 4", gpus=4) for t in ("quad-a", "quad-b")])
    running, final = set(), {}
    offered_while_both_ran = []
    third = None
    while {"quad-a", "quad-b", "quad-c"} - set(final):
        got, payload = fw.event(left())
        if got == MesosClient.UPDATE:
            fact = status_fact(payload["status"])
            report(status=fact)
            if fact["state"] == "TASK_RUNNING":
                running.add(fact["task"])
            if fact["state"] in FINAL:
                final[fact["task"]] = fact["state"]
        elif got == MesosClient.OFFERS:
            for o in payload:
                gpus = scalar(o.get_offer(), "gpus")
                both_run = {"quad-a", "quad-b"} <= running and not {"quad-a", "quad-b"} & set(final)
                if both_run:
                    offered_while_both_ran.append(gpus)
                if third is None and {"quad-a", "quad-b"} & set(final) and gpus >= 4:
                    third = o
                    report(offered_while_both_ran=offered_while_both_ran, third_from_offer_with=gpus)
                    fw.accept(o, [task("quad-c", agent_id, "sleep 1", gpus=4)])
                else:
                    fw.decline([o], refuse_seconds=0.2)
    if not offered_while_both_ran:
        fail("no offer came while quad-a and quad-b both ran")
    expect_finished(final)
    fw.stop()


def run_faulty():
    fw = Framework("gpu-faulty", gpu_aware=True)
    held = fw.offer_where(lambda o: scalar(o, "gpus") == 8, "8 gpus")
    held_id = held.get_offer()["id"]["value"]
    report(held={"offer": held_id, "gpus": 8})
    # Kept, not declined: the master must take it back once GPU 3 is gone.
    wait_for_test("healthy-offer-held")
    faulted = time.monotonic()
    rescinded, seven = None, None
    while rescinded is None or seven is None:
        waited = time.monotonic() - faulted
        if waited > 15:
            fail("%.0f s after GPU 3 failed: rescinded after %s s, offer with 7 gpus: %s"
                 % (waited, rescinded, seven is not None))
        got, payload = fw.event(0.5)
        if got == MesosClient.RESCIND and payload["offer_id"]["value"] == held_id:
            rescinded = time.monotonic() - faulted
        elif got == MesosClient.OFFERS:
            for o in payload:
                gpus = scalar(o.get_offer(), "gpus")
                report(offer_after_fault={"gpus": gpus, "seconds": round(time.monotonic() - faulted, 3)})
                if seven is None and gpus == 7:
                    seven = o
                else:
                    fw.decline([o])
    report(rescinded_after=round(rescinded, 3), seven_after=round(time.monotonic() - faulted, 3))
    fw.accept(seven, [task("seven", seven.get_offer()["agent_id"], "sleep 1", gpus=7)])
    expect_finished(until_final(fw, ["seven"]))
    fw.stop()


def run_memory():
    fw = Framework("gpu-memory", gpu_aware=True)
    offer = fw.offer_where(lambda o: scalar(o, "gpus") >= 1, "a gpu")
    agent_id = offer.get_offer()["agent_id"]
    fw.accept(offer, [task("holder", agent_id, "sleep 30", gpus=1)])
    while True:
        fact = status(fw, left())
        if fact is None:
            fail("holder never ran")
        if fact["state"] in FINAL:
            fail("holder ended before the test looked: %s" % fact)
        if fact["state"] == "TASK_RUNNING":
            break
    wait_for_test("holder-running", framework_id=fw.driver.frameworkId, labels=fact["labels"])
    fw.driver.kill(agent_id["value"], "holder")
    final = until_final(fw, ["holder"])
    if final["holder"] != "TASK_KILLED":
        fail("holder: %s" % final)
    fw.stop()


def main():
    if MODE == "fenced":
        run_fenced(sys.argv[4])
    elif MODE == "quads":
        run_quads()
    elif MODE == "faulty":
        run_faulty()
    elif MODE == "memory":
        run_memory()
    else:
        fail("unknown mode %s" % MODE)
    report(ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
