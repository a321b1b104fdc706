#!/usr/bin/env python3
"""Capture the MQTT packets real clients send (and a real broker answers).

Runs a Mosquitto 2 broker on a loopback port (plain TCP, for the capture
only: Bastion never listens in cleartext), a recording proxy in front of
it, and the mosquitto_pub / mosquitto_sub commands below through the
proxy. Every packet of every connection is written to a file named
<case>-<nn>-<c2s|s2c>-<type>.bin in this directory: the fixed header and
the body, as on the wire. Run it from this directory:

    python3 capture.py

The paho.golang packets are captured by FuzzDecodePacket itself (no
binary of it to run here).
"""
import os, signal, socket, subprocess, sys, tempfile, threading, time

TYPES = {1: "connect", 2: "connack", 3: "publish", 4: "puback", 5: "pubrec", 6: "pubrel", 7: "pubcomp",
         8: "subscribe", 9: "suback", 10: "unsubscribe", 11: "unsuback", 12: "pingreq", 13: "pingresp",
         14: "disconnect", 15: "auth"}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def split(data):
    """Cut a byte stream into MQTT packets (fixed header + body)."""
    out, i = [], 0
    while i < len(data):
        j, n, mul = i + 1, 0, 1
        while True:
            b = data[j]
            n += (b & 0x7F) * mul
            mul *= 128
            j += 1
            if b & 0x80 == 0:
                break
        out.append(data[i:j + n])
        i = j + n
    return out


def pipe(src, dst, buf):
    while True:
        b = src.recv(65536)
        if not b:
            break
        buf.extend(b)
        dst.sendall(b)
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def proxy_once(lsock, broker_port, c2s, s2c):
    c, _ = lsock.accept()
    b = socket.create_connection(("127.0.0.1", broker_port))
    t1 = threading.Thread(target=pipe, args=(c, b, c2s))
    t2 = threading.Thread(target=pipe, args=(b, c, s2c))
    t1.start(); t2.start(); t1.join(); t2.join()
    c.close(); b.close()


def run_case(name, argv, broker_port, bg=None):
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    c2s, s2c = bytearray(), bytearray()
    t = threading.Thread(target=proxy_once, args=(lsock, broker_port, c2s, s2c), daemon=True)
    t.start()
    p = subprocess.Popen([a.replace("PORT", str(port)) for a in argv])
    if bg:
        time.sleep(0.5)  # the subscription is in before the publish (a capture tool, not a test)
        subprocess.run([a.replace("PORT", str(broker_port)) for a in bg], check=True)
    p.wait(timeout=10)
    t.join(timeout=10)
    lsock.close()
    n = 0
    for d, data in (("c2s", c2s), ("s2c", s2c)):
        for pk in split(bytes(data)):
            n += 1
            fn = "%s-%02d-%s-%s.bin" % (name, n, d, TYPES.get(pk[0] >> 4, "t%d" % (pk[0] >> 4)))
            with open(fn, "wb") as f:
                f.write(pk)
            print(fn, len(pk))


def main():
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = os.path.join(tmp, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write("listener %d 127.0.0.1\nallow_anonymous true\n" % port)
        broker = subprocess.Popen(["mosquitto", "-c", conf])
        time.sleep(0.5)
        try:
            pub = ["mosquitto_pub", "-h", "127.0.0.1", "-p", "PORT"]
            sub = ["mosquitto_sub", "-h", "127.0.0.1", "-p", "PORT"]
            run_case("mosquitto_pub-v311-qos1", pub + ["-V", "mqttv311", "-i", "dev1", "-u", "dev1", "-P", "s3cret",
                     "-k", "30", "-t", "devices/dev1/t/temp", "-m", '{"t":21.5}', "-q", "1",
                     "--will-topic", "devices/dev1/status", "--will-payload", "offline", "--will-qos", "1", "--will-retain"], port)
            run_case("mosquitto_pub-v311-qos2-retain", pub + ["-V", "mqttv311", "-i", "dev2", "-c", "-t", "devices/dev2/t/fw",
                     "-m", "1.2.3", "-q", "2", "-r"], port)
            run_case("mosquitto_pub-v5-props", pub + ["-V", "mqttv5", "-i", "dev3", "-x", "3600", "-q", "1",
                     "-t", "devices/dev3/t/json", "-m", '{"hum":40}',
                     "-D", "connect", "receive-maximum", "20", "-D", "connect", "maximum-packet-size", "65536",
                     "-D", "connect", "topic-alias-maximum", "5", "-D", "connect", "user-property", "fw", "1.0.0",
                     "-D", "publish", "content-type", "application/json", "-D", "publish", "message-expiry-interval", "60",
                     "-D", "publish", "payload-format-indicator", "1", "-D", "publish", "response-topic", "devices/dev3/r",
                     "-D", "publish", "correlation-data", "c0ffee", "-D", "publish", "user-property", "unit", "percent",
                     "-D", "publish", "topic-alias", "1",
                     "--will-topic", "devices/dev3/status", "--will-payload", "gone", "--will-qos", "1",
                     "-D", "will", "will-delay-interval", "10", "-D", "will", "content-type", "text/plain",
                     "-D", "disconnect", "reason-string", "bye"], port)
            run_case("mosquitto_pub-v5-qos2", pub + ["-V", "mqttv5", "-i", "dev4", "-q", "2", "-n", "-t", "devices/dev4/t/empty"], port)
            run_case("mosquitto_sub-v311", sub + ["-V", "mqttv311", "-i", "gw-sub", "-q", "1", "-C", "1",
                     "-t", "bastion/gw1/+/c/#", "-t", "devices/+/t/#", "-T", "devices/+/t/noise"], port,
                     bg=["mosquitto_pub", "-h", "127.0.0.1", "-p", "PORT", "-q", "1", "-t", "bastion/gw1/dev1/c/led/set", "-m", "on"])
            run_case("mosquitto_sub-v5", sub + ["-V", "mqttv5", "-i", "gw-sub5", "-q", "2", "-C", "1",
                     "-t", "bastion/gw1/+/c/#", "--retain-as-published",
                     "-D", "subscribe", "subscription-identifier", "7", "-D", "subscribe", "user-property", "k", "v",
                     "-D", "connect", "topic-alias-maximum", "10", "-D", "connect", "request-problem-information", "1",
                     "-D", "connect", "request-response-information", "1", "-D", "connect", "session-expiry-interval", "60"], port,
                     bg=["mosquitto_pub", "-h", "127.0.0.1", "-p", "PORT", "-V", "mqttv5", "-q", "2", "-r", "-t",
                         "bastion/gw1/dev9/c/reboot", "-m", "now", "-D", "publish", "user-property", "by", "cloud"])
            run_case("mosquitto_sub-v5-unsubscribe", sub + ["-V", "mqttv5", "-i", "gw-unsub", "-U", "bastion/gw1/+/c/#",
                     "-U", "devices/#", "-t", "devices/none/x", "-E", "-D", "unsubscribe", "user-property", "why", "done"], port)
        finally:
            broker.send_signal(signal.SIGTERM)
            broker.wait(timeout=10)


if __name__ == "__main__":
    main()
