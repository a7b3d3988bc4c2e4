"""A mesoshttp 0.4.2 framework that runs real tasks on a Butte agent, driven
by tests/agent_e2e.rs. Prints one JSON line per finished check and exits 0
only if every expectation held.

Usage: agent_framework.py MASTER_URL MODE [TIMEOUT] [AGENT_PORT CGROUP_SUBTREE]
  MODE e2e:       50 `echo hello-$i` tasks, a memory hog, `exit 3`, a killed
                  `sleep 600`, and an `inspect` task that records what it sees.
  MODE churn:     200 `sleep 600` tasks launched and killed (40 under emulation).
  MODE telemetry: iperf3 clients with network_bandwidth 20, 100 and 500 (to
                  servers the test runs on ports 15190-15192) and one without
                  (15193); a busy loop and a sender whose CPU time and tx bytes
                  the agent's GET_CONTAINERS must agree on with cpuacct and with
                  what the sink here received; the master's GET_METRICS and
                  /telemetry history must have them.
"""

import os
import json
import queue
import requests
import socket
import sys
import threading
import time

from mesoshttp.client import MesosClient

URL, MODE = sys.argv[1], sys.argv[2]
TIMEOUT = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
DEADLINE = time.monotonic() + TIMEOUT
# scripts/vm-test runs this under emulation: bounds on waits grow.
SLOWDOWN = 10 if os.environ.get("BUTTE_VM") else 1
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


def task(task_id, agent_id, command, cpus=0.05, mem=32, user=None, disk=None, labels=None):
    info = {
        "name": task_id,
        "task_id": {"value": task_id},
        "agent_id": agent_id,
        "resources": [
            {"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}},
            {"name": "mem", "type": "SCALAR", "scalar": {"value": mem}},
        ],
        "command": {"value": command},
    }
    if user is not None:
        info["command"]["user"] = user
    if disk is not None:
        info["resources"].append({"name": "disk", "type": "SCALAR", "scalar": {"value": disk}})
    if labels:
        info["labels"] = {"labels": [{"key": k, "value": v} for k, v in labels.items()]}
    return info


SINK_PORT = 15194
SEND_BYTES = 10000000
# Sends SEND_BYTES, waits until the sink has them all, then reports by UDP
# what its socket really sent (tcpi_bytes_sent: retransmissions included; a
# loaded machine makes TCP resend real bytes) so the count can be held to 1 %.
SENDER_SCRIPT = """
import socket, struct
s = socket.create_connection(("127.0.0.1", %d))
s.sendall(bytes(%d))
s.shutdown(socket.SHUT_WR)
s.recv(1)
sent = struct.unpack_from("Q", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232), 200)[0]
s.close()
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(str(sent).encode(), ("127.0.0.1", %d))
""" % (SINK_PORT, SEND_BYTES, SINK_PORT)
SENDER = 'python3 -c "$SENDER_SCRIPT"; sleep 6'


def iperf_task(task_id, agent_id, port, mbit, seconds=5):
    t = task(task_id, agent_id, "exec iperf3 -c 127.0.0.1 -p %d -t %d -J > $MESOS_SANDBOX/iperf.json" % (port, seconds),
             cpus=1, mem=64)
    if mbit:
        t["resources"].append({"name": "network_bandwidth", "type": "SCALAR", "scalar": {"value": mbit}})
    return t


def sender_task(agent_id):
    # Held to 200 Mbit/s so the sink here keeps up: a receiver that falls
    # behind on a busy machine drops segments, and their retransmissions are
    # real bytes sent twice. Our own limit's drops are not counted as sent.
    t = task("sender", agent_id, SENDER, cpus=0.5, mem=64)
    t["resources"].append({"name": "network_bandwidth", "type": "SCALAR", "scalar": {"value": 200}})
    t["command"]["environment"] = {"variables": [{"name": "SENDER_SCRIPT", "value": SENDER_SCRIPT}]}
    return t


def sink(received, reported):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", SINK_PORT))
    listener.listen(1)
    report = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    report.bind(("127.0.0.1", SINK_PORT))
    conn, _ = listener.accept()
    total = 0
    while True:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        total += len(chunk)
    conn.close()
    received.append(total)
    reported.append(int(report.recv(64)))


def operator_call(url, call):
    answer = requests.post(url + "/api/v1", json={"type": call}, headers={"Accept": "application/json"})
    if answer.status_code != 200:
        fail("%s at %s answered %d: %s" % (call, url, answer.status_code, answer.text))
    return answer.json()


def kernel_cpu_seconds(subtree, container):
    """The cgroup's CPU time as the kernel books it: v1 cpuacct where the host
    has it, else the v2 node's cpu.stat (pure cgroup v2)."""
    v1 = "/sys/fs/cgroup/cpuacct/%s/%s/cpuacct.usage" % (subtree, container)
    if os.path.exists(v1):
        with open(v1) as f:
            return int(f.read()) / 1e9
    with open("/sys/fs/cgroup/%s/%s/cpu.stat" % (subtree, container)) as f:
        usage = dict(line.split() for line in f)["usage_usec"]
    return int(usage) / 1e6


def check_telemetry(driver, agent_port, subtree, received, reported):
    """Busy and sender are sleeping now: their figures no longer move, so the
    agent's last sample and the kernel's other books must agree."""
    agent_url = "http://127.0.0.1:%d" % agent_port
    containers = operator_call(agent_url, "GET_CONTAINERS")["get_containers"]["containers"]
    by_task = {}
    for c in containers:
        by_task[c["executor_id"]["value"]] = c
    for needed in ("busy", "sender"):
        if needed not in by_task:
            fail("GET_CONTAINERS has no %s: %s" % (needed, json.dumps(containers)[:2000]))
    busy = by_task["busy"]
    ebpf_cpu = busy["butte_statistics"]["cpus_total_time_secs"]
    cpuacct = kernel_cpu_seconds(subtree, busy["container_id"]["value"])
    stats = busy["resource_statistics"]
    user_system = stats["cpus_user_time_secs"] + stats["cpus_system_time_secs"]
    sender = by_task["sender"]["resource_statistics"]
    report = {"busy_cpu_ebpf": ebpf_cpu, "busy_cpu_cpuacct": cpuacct, "busy_user_plus_system": user_system,
              "busy_mem_rss": stats.get("mem_rss_bytes"), "busy_runq_p99_us":
              busy["butte_statistics"].get("runq_latency_p99_micros"),
              "sender_tx_bytes": sender.get("net_tx_bytes"), "sender_tx_packets": sender.get("net_tx_packets"), "sink_received": received[0] if received else None}
    print(json.dumps({"telemetry": report}), flush=True)
    if not (cpuacct > 1.0 and abs(ebpf_cpu - cpuacct) <= 0.02 * cpuacct):
        fail("busy CPU: eBPF %.4f s vs cpuacct %.4f s" % (ebpf_cpu, cpuacct))
    if abs(user_system - ebpf_cpu) > 1e-6:
        fail("user + system %.6f != total %.6f" % (user_system, ebpf_cpu))
    if not stats.get("mem_limit_bytes") == 64 * 1024 * 1024 or not stats.get("mem_total_bytes"):
        fail("busy memory figures: %s" % stats)
    # The run-queue histogram only for the task whose label asks for it;
    # pressure (PSI totals) for every task.
    if busy["butte_statistics"].get("runq_waits", 0) < 1 or "runq_latency_p99_micros" not in busy["butte_statistics"]:
        fail("busy asked for its run-queue histogram: %s" % busy["butte_statistics"])
    if "runq_waits" in by_task["sender"]["butte_statistics"]:
        fail("sender did not ask for a run-queue histogram: %s" % by_task["sender"]["butte_statistics"])
    if busy["butte_statistics"].get("cpu_pressure_some_secs") is None or \
            busy["butte_statistics"].get("memory_pressure_some_secs") is None:
        fail("busy has no pressure totals: %s" % busy["butte_statistics"])
    # Read on demand from cgroupfs: busy is its shell and a sleep now, and
    # its 2 s busy loop ran under a 1-core quota (100 ms periods). One thread
    # under a 1-core quota is rarely throttled: container.rs checks a loop
    # that is; here the figures must be there and agree with each other.
    if not (1 <= stats.get("processes", 0) <= 3 and stats.get("threads", 0) == stats.get("processes")):
        fail("busy process and thread counts: %s" % stats)
    periods, throttled = stats.get("cpus_nr_periods", 0), stats.get("cpus_nr_throttled", -1)
    if not (periods >= 15 and 0 <= throttled <= periods and stats.get("cpus_throttled_time_secs", -1) >= 0):
        fail("busy CPU throttling figures: %s" % stats)
    # The sandbox measured on demand (disk/du): the 1 MiB blob, stdout, stderr.
    if not (1 << 20 <= stats.get("disk_used_bytes", 0) < (1 << 20) + (256 << 10)):
        fail("busy disk_used_bytes: %s" % stats.get("disk_used_bytes"))
    if not received or received[0] != SEND_BYTES:
        fail("the sink received %s bytes, not %d" % (received, SEND_BYTES))
    # Bytes are IP packets: the payload plus 52 B of IPv4 + TCP (with
    # timestamps) headers per segment. At least every byte once; at most
    # what the socket sent with its retransmissions (those our limit
    # dropped are not counted, those resent needlessly on a loaded machine
    # are), each within 1 %.
    tx, packets = sender.get("net_tx_bytes", 0), sender.get("net_tx_packets", 0)
    if not reported:
        fail("the sender did not report what its socket sent")
    least, most = SEND_BYTES + 52 * packets, reported[0] + 52 * packets
    if not (SEND_BYTES <= tx and 0.99 * least <= tx <= 1.01 * most):
        fail("sender tx counted %d B in %d packets for %d B sent, %d with retransmissions (expected %d..%d)"
             % (tx, packets, SEND_BYTES, reported[0], least, most))
    metrics = requests.get("http://127.0.0.1:%d/metrics" % agent_port).text
    labels = '{framework_id="%s",executor_id="busy",task_id="busy"}' % driver.frameworkId
    if "butte_task_cpu_seconds_total" + labels not in metrics:
        fail("the agent's /metrics has no CPU series for busy:\n" + metrics[:3000])
    if "butte_task_cpu_pressure_some_seconds_total" + labels not in metrics:
        fail("the agent's /metrics has no CPU pressure series for busy:\n" + metrics[:3000])
    # The disk watcher's newest measure of its sandbox, and its disk (8 MB).
    series = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("butte_task_disk_"))
    used = float(series.get("butte_task_disk_used_bytes" + labels, -1))
    if not (1 << 20 <= used < (1 << 20) + (256 << 10)) or \
            float(series.get("butte_task_disk_limit_bytes" + labels, -1)) != 8 << 20:
        fail("busy's disk series in /metrics: %s" % series)
    master_metrics = {m["name"]: m.get("value") for m in operator_call(driver.mesos_url, "GET_METRICS")["get_metrics"]["metrics"]}
    name = "butte/tasks/%s/busy/cpus_total_time_secs" % driver.frameworkId
    if name not in master_metrics:
        fail("the master's GET_METRICS has no %s" % name)
    history = requests.get(driver.mesos_url + "/telemetry",
                           params={"framework_id": driver.frameworkId, "task_id": "busy"}).json()["samples"]
    if len(history) < 2:
        fail("the master kept %d samples of busy" % len(history))


def run_telemetry(driver, offer, agent_id, agent_port, subtree):
    received, reported = [], []
    threading.Thread(target=sink, args=(received, reported), daemon=True).start()
    first = [iperf_task("bw-20", agent_id, 15190, 20), iperf_task("bw-100", agent_id, 15191, 100),
             iperf_task("bw-500", agent_id, 15192, 500),
             task("busy", agent_id, "head -c 1048576 /dev/zero > $MESOS_SANDBOX/blob; "
                  "timeout 2 sh -c 'while :; do :; done'; sleep 6", cpus=1, mem=64, disk=8,
                  labels={"butte.telemetry.runqueue_histogram": "true"}),
             sender_task(agent_id)]
    offer.accept(first)
    print(json.dumps({"launched": len(first)}), flush=True)
    final = {}
    started = {}
    checked = False
    while len(final) < len(first) + 1:
        event, payload = None, None
        left = DEADLINE - time.monotonic()
        if left <= 0:
            fail("timed out; final so far: %s" % final)
        try:
            event, payload = events.get(timeout=min(left, 0.5))
        except queue.Empty:
            pass
        if event == "ERROR":
            fail("master sent ERROR: %s" % payload)
        if event == "UPDATE":
            status = payload["status"]
            task_id, state = status["task_id"]["value"], status["state"]
            if state == "TASK_RUNNING":
                started[task_id] = time.monotonic()
            if state in ("TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_ERROR", "TASK_LOST", "TASK_DROPPED"):
                final[task_id] = {"state": state, "message": status.get("message", "")}
        if event == "OFFERS" and all(t["task_id"]["value"] in final for t in first[:3]) and "bw-none" not in started:
            # The limited clients are done: the unlimited one runs alone.
            started["bw-none"] = time.monotonic()
            payload[0].accept([iperf_task("bw-none", agent_id, 15193, 0, 2)])
        elif event == "OFFERS":
            for o in payload:
                o.decline({"filters": {"refuse_seconds": 0.5}})
        if not checked and "busy" in started and time.monotonic() - started["busy"] > 4 and "busy" not in final:
            checked = True
            check_telemetry(driver, agent_port, subtree, received, reported)
    print(json.dumps({"final": final}), flush=True)
    if not checked:
        fail("busy ended before its telemetry was checked")
    problems = ["%s: %s" % (t, r) for t, r in final.items() if r["state"] != "TASK_FINISHED"]
    if problems:
        fail("; ".join(problems))


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
        if MODE == "telemetry":
            run_telemetry(driver, offer, agent_id, int(sys.argv[4]), sys.argv[5])
            driver.tearDown()
            print(json.dumps({"ok": True}), flush=True)
            return 0
        if MODE == "disk":
            # 30 MB into a sandbox of disk:10; the Rust test judges the outcome
            # (refused by a project quota, or failed by the agent's du).
            hog = task("quota-hog", agent_id,
                       "dd if=/dev/zero of=$MESOS_SANDBOX/fill bs=1M count=30 2> $MESOS_SANDBOX/dd.err; "
                       "echo $? > $MESOS_SANDBOX/dd.rc; sleep 3", disk=10)
            offer.accept([hog])
            while True:
                status = next_event("UPDATE")["status"]
                if status["state"] in ("TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_ERROR", "TASK_LOST"):
                    print(json.dumps({"final": {"quota-hog": {"state": status["state"], "reason": status.get("reason", ""),
                                                              "message": status.get("message", "")}}}), flush=True)
                    break
            driver.tearDown()
            print(json.dumps({"ok": True}), flush=True)
            return 0
        if MODE == "e2e":
            tasks = [task("echo-%d" % i, agent_id, "echo hello-%d" % i) for i in range(50)]
            tasks.append(task("memhog", agent_id, "exec dd if=/dev/zero of=/dev/null bs=256M count=1", mem=32))
            tasks.append(task("exit3", agent_id, "exit 3"))
            tasks.append(task("sleeper", agent_id, "sleep 600"))
            tasks.append(task("inspect", agent_id, INSPECT))
            tasks.append(task("as-nobody", agent_id,
                              "id -u > $MESOS_SANDBOX/uid; grep CapEff /proc/self/status > $MESOS_SANDBOX/caps",
                              user="nobody"))
            tasks.append(task("as-stranger", agent_id, "true", user="no-such-user-butte"))
            chown_only = task("caps-chown", agent_id, "grep CapEff /proc/self/status > $MESOS_SANDBOX/caps")
            chown_only["container"] = {"type": "MESOS", "linux_info": {
                "effective_capabilities": {"capabilities": ["CHOWN"]}}}
            tasks.append(chown_only)
            beyond = task("caps-beyond", agent_id, "true")
            beyond["container"] = {"type": "MESOS", "linux_info": {
                "effective_capabilities": {"capabilities": ["NET_ADMIN"]}}}
            tasks.append(beyond)
            # An operator's seccomp profile (--seccomp-config-dir) named by the task.
            profiled = task("seccomp-profile", agent_id,
                            "mkdir $MESOS_SANDBOX/d 2> $MESOS_SANDBOX/mkdir.err; echo $? > $MESOS_SANDBOX/mkdir.rc")
            profiled["container"] = {"type": "MESOS", "linux_info": {
                "seccomp": {"profile_name": "no-mkdir.json"}}}
            tasks.append(profiled)
            unknown_profile = task("seccomp-unknown", agent_id, "true")
            unknown_profile["container"] = {"type": "MESOS", "linux_info": {
                "seccomp": {"profile_name": "no-such-profile.json"}}}
            tasks.append(unknown_profile)
            disk_hog = task("disk-hog", agent_id,
                            "dd if=/dev/zero of=$MESOS_SANDBOX/fill bs=1M count=30 2>/dev/null; sleep 60")
            disk_hog["resources"].append({"name": "disk", "type": "SCALAR", "scalar": {"value": 10}})
            tasks.append(disk_hog)
            tasks.append(ports_task("ports", agent_id))
            tasks.append(task("devices", agent_id,
                              "cat /dev/null && echo null=ok; cat /dev/butte-kt-fake 2>&1 | head -1; true"))
            group = [task("group-%s" % g, agent_id, "readlink /proc/self/ns/pid > ns; sleep 1") for g in "abc"]
        else:
            # 200 on a host; under scripts/vm-test's emulation a launch takes
            # a second or more, so fewer (what leaks, leaks at any count).
            count = 40 if SLOWDOWN > 1 else 200
            tasks = [task("churn-%d" % i, agent_id, "sleep 600", cpus=0.01, mem=4) for i in range(count)]
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
        running = set()
        while len(final) < len(tasks):
            status = next_event("UPDATE")["status"]
            task_id, state = status["task_id"]["value"], status["state"]
            if state == "TASK_RUNNING":
                running.add(task_id)
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
            # The 3 s grace, then SIGKILL: a bound on escalation, not a speed
            # (scaled in scripts/vm-test's emulated kernels).
            if final["sleeper"]["state"] != "TASK_KILLED" or final["sleeper"]["kill_seconds"] > 3 + 2 * SLOWDOWN:
                problems.append("sleeper: %s" % final["sleeper"])
            if final["devices"]["state"] != "TASK_FINISHED":
                problems.append("devices: %s" % final["devices"])
            if final["ports"]["state"] != "TASK_FINISHED":
                problems.append("ports: %s" % final["ports"])
            if final["inspect"]["state"] != "TASK_FINISHED":
                problems.append("inspect: %s" % final["inspect"])
            if final["as-nobody"]["state"] != "TASK_FINISHED":
                problems.append("as-nobody: %s" % final["as-nobody"])
            if final["caps-chown"]["state"] != "TASK_FINISHED":
                problems.append("caps-chown: %s" % final["caps-chown"])
            if final["caps-beyond"]["state"] != "TASK_FAILED" or "NET_ADMIN" not in final["caps-beyond"]["message"]:
                problems.append("caps-beyond: %s" % final["caps-beyond"])
            if final["seccomp-profile"]["state"] != "TASK_FINISHED":
                problems.append("seccomp-profile: %s" % final["seccomp-profile"])
            unknown = final["seccomp-unknown"]
            if unknown["state"] != "TASK_FAILED" or "'no-such-profile.json'" not in unknown["message"]:
                problems.append("seccomp-unknown: %s" % unknown)
            hog = final["disk-hog"]
            if hog["state"] != "TASK_FAILED" or hog["reason"] != "REASON_CONTAINER_LIMITATION_DISK":
                problems.append("disk-hog: %s" % hog)
            stranger = final["as-stranger"]
            if stranger["state"] != "TASK_FAILED" or "'no-such-user-butte'" not in stranger["message"]:
                problems.append("as-stranger: %s" % stranger)
            for g in "abc":
                if final["group-" + g]["state"] != "TASK_FINISHED":
                    problems.append("group-%s: %s" % (g, final["group-" + g]))
            # A task that ran to its end was RUNNING first, however short it was.
            ran = [t for t, r in final.items() if r["state"] == "TASK_FINISHED" or t in ("exit3", "memhog")]
            never_running = sorted(t for t in ran if t not in running)
            if never_running:
                problems.append("ended without TASK_RUNNING first: %s" % ", ".join(never_running))
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
