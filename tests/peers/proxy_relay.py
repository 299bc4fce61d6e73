"""An OpenSSH ProxyCommand standing in for a TCP load balancer that speaks the PROXY protocol.

Usage: proxy_relay.py HOST PORT VERSION CLIENT_IP
Connects to HOST:PORT, sends a PROXY protocol header (VERSION 1 or 2) claiming the connection
comes from CLIENT_IP, then relays standard input and output to and from the connection.
"""
import ipaddress
import socket
import struct
import sys
import threading

host, port, version, client = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
connection = socket.create_connection((host, port))
if version == "1":
    connection.sendall(f"PROXY TCP4 {client} {host} 40000 {port}\r\n".encode())
else:
    body = (
        ipaddress.IPv4Address(client).packed
        + ipaddress.IPv4Address(host).packed
        + struct.pack("!HH", 40000, port)
    )
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    connection.sendall(signature + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body)


def upstream():
    while True:
        data = sys.stdin.buffer.read1(65536)
        if not data:
            connection.shutdown(socket.SHUT_WR)
            return
        connection.sendall(data)


threading.Thread(target=upstream, daemon=True).start()
while True:
    data = connection.recv(65536)
    if not data:
        break
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
