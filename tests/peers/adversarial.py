"""Hostile SFTP requests that the OpenSSH client will not send, sent with paramiko.

Usage: adversarial.py HOST PORT USER KEY OTHER_USER OTHER_KEY
Prints one JSON object: case name -> outcome ("ok", "denied", "no such file", "unsupported",
"bad message", "failure: <message>", "closed", "closed, exit status N", "hung"). The Rust test
decides what each must be. A session of OTHER_USER, opened first with an upload under way, must
still work after every hostile case.
"""
import errno
import json
import socket
import struct
import sys

import paramiko
from paramiko import sftp as proto

host, port, user, key, other_user, other_key = sys.argv[1:7]
port = int(port)
results = {}


def connect(username, key_file):
    transport = paramiko.Transport((host, port))
    transport.connect(username=username, pkey=paramiko.Ed25519Key.from_private_key_file(key_file))
    return transport, paramiko.SFTPClient.from_transport(transport)


def outcome(error):
    if isinstance(error, PermissionError) or getattr(error, "errno", None) == errno.EACCES:
        return "denied"
    if isinstance(error, FileNotFoundError) or getattr(error, "errno", None) == errno.ENOENT:
        return "no such file"
    text = str(error)
    if "unsupported" in text.lower() or "not supported" in text.lower():
        return "unsupported"
    if "bad message" in text.lower() or "malformed" in text.lower():
        return "bad message"
    return "failure: " + text


def attempt(name, action):
    try:
        action()
        results[name] = "ok"
    except (IOError, OSError, paramiko.SSHException, EOFError) as error:
        results[name] = outcome(error)


def raw(sftp, kind, body):
    """Sends one raw packet (type + body) and returns (status code, message) of the STATUS reply."""
    sftp._send_packet(kind, body)
    reply_type, data = sftp._read_packet()
    message = paramiko.Message(data)
    message.get_int()  # request id
    if reply_type != proto.CMD_STATUS:
        return ("type %d" % reply_type, "")
    return (message.get_int(), message.get_text())


# A bystander: another user's session, with an upload open, that lives through every hostile case.
bystander_transport, bystander = connect(other_user, other_key)
bystander.sock.settimeout(30)
bystander_upload = bystander.open("bystander.txt", "w")
bystander_upload.write(b"written before the hostile cases, ")
bystander_upload.flush()

transport, sftp = connect(user, key)
with sftp.open("mine.txt", "w") as upload:
    upload.write(b"mine")

for index, path in enumerate(["../x", "/../x", "a/../../x", "/a/b/../../../x", "..", "/.."]):
    attempt("dotdot %d open %s" % (index, path), lambda p=path: sftp.open(p, "w").close())
    attempt("dotdot %d stat %s" % (index, path), lambda p=path: sftp.stat(p))
attempt("absolute /etc/passwd stat", lambda: sftp.stat("/etc/passwd"))
attempt("nul in path", lambda: sftp.open("a\x00b", "w").close())
attempt("symlink", lambda: sftp.symlink("/etc/passwd", "link"))
attempt("readlink", lambda: sftp.readlink("mine.txt"))
attempt("hardlink", lambda: sftp._request(proto.CMD_EXTENDED, "hardlink@openssh.com", "mine.txt", "hard.txt"))
attempt("rename out of home", lambda: sftp.rename("mine.txt", "../escaped.txt"))
attempt("rename onto another user", lambda: sftp.rename("mine.txt", "/../%s/stolen.txt" % other_user))
attempt("posix-rename out of home", lambda: sftp.posix_rename("mine.txt", "/../../x"))
attempt("open read on upload", lambda: sftp.open("mine.txt", "r").read())
attempt(
    "open read|write|create",
    lambda: sftp._request(
        proto.CMD_OPEN, "rw.txt", proto.SFTP_FLAG_READ | proto.SFTP_FLAG_WRITE | proto.SFTP_FLAG_CREATE,
        paramiko.SFTPAttributes(),
    ),
)


def sparse():
    handle = sftp.open("sparse.bin", "w")
    handle.seek(1 << 40)
    handle.write(b"x")
    handle.close()


attempt("write at 1 TB", sparse)


def read_request(request_id, handle):
    message = paramiko.Message()
    message.add_int(request_id)
    message.add_string(handle)
    message.add_int64(0)
    message.add_int(10)
    return message


def write_request(request_id, handle, data):
    message = paramiko.Message()
    message.add_int(request_id)
    message.add_string(handle)
    message.add_int64(0)
    message.add_string(data)
    return message


_, opened = sftp._request(proto.CMD_OPENDIR, "/")
folder_handle = opened.get_binary()
code, text = raw(sftp, proto.CMD_READ, read_request(4240, folder_handle))
results["folder handle used as a file"] = "status %s: %s" % (code, text)

other_transport, other_sftp = connect(other_user, other_key)
_, message = other_sftp._request(
    proto.CMD_OPEN, "theirs.txt", proto.SFTP_FLAG_WRITE | proto.SFTP_FLAG_CREATE | proto.SFTP_FLAG_TRUNC,
    paramiko.SFTPAttributes(),
)
their_handle = message.get_binary()
code, text = raw(sftp, proto.CMD_WRITE, write_request(4241, their_handle, b"hijack"))
results["handle of another session"] = "status %s: %s" % (code, text)
other_sftp._request(proto.CMD_CLOSE, their_handle)
other_transport.close()

attempt("unknown extension", lambda: sftp._request(proto.CMD_EXTENDED, "bogus@example.com"))

request = paramiko.Message()
request.add_int(4242)
code, text = raw(sftp, 99, request)
results["unknown packet type"] = "status %s" % code
truncated = paramiko.Message()
truncated.add_int(4243)
code, text = raw(sftp, proto.CMD_OPEN, truncated)
results["truncated open"] = "status %s" % code
attempt("still serving after bad packets", lambda: sftp.stat("mine.txt"))


def cut_short(name, data, then_close):
    """A session that sends `data` (a packet cut short) and then half-closes its channel (EOF) or
    drops the whole connection. After an EOF the server must end the session, not wait for more."""
    cut_transport, cut_sftp = connect(user, key)
    channel = cut_sftp.sock
    channel.sendall(data)
    if then_close:
        cut_transport.close()
        results[name] = "sent"
        return
    channel.shutdown_write()
    channel.settimeout(10)
    try:
        rest = channel.recv(1 << 16)
        if rest:
            results[name] = "answered %r" % rest[:40]
        elif channel.status_event.wait(10):
            results[name] = "closed, exit status %d" % channel.exit_status
        else:
            results[name] = "closed without an exit status"
    except socket.timeout:
        results[name] = "hung"
    cut_transport.close()


# Declares 1,000 bytes, sends 9: an OPEN whose path never arrives.
cut_short("packet cut short, then EOF", struct.pack(">IBI", 1000, proto.CMD_OPEN, 4244) + b"\0\0\0\x07", False)
cut_short("packet cut short, then disconnect", struct.pack(">IBI", 5000, proto.CMD_WRITE, 4245), True)
cut_short("length cut short, then EOF", b"\0\0", False)
attempt("still serving after cut-short packets", lambda: sftp.stat("mine.txt"))

# A 1 MiB packet: over the limit, the session is closed…
try:
    channel = sftp.sock
    channel.sendall(struct.pack(">I", (1 << 20) + 1) + bytes([proto.CMD_WRITE]) + b"\0" * (1 << 20))
    sftp._read_packet()
    results["1 MiB packet"] = "answered"
except (EOFError, OSError, paramiko.SSHException):
    results["1 MiB packet"] = "closed"
transport.close()

# …and the server keeps serving new sessions.
transport, sftp = connect(user, key)
attempt("new session after the oversized packet", lambda: sftp.stat("mine.txt"))
transport.close()


def bystander_carries_on():
    bystander_upload.write(b"and finished after them")
    bystander_upload.close()
    if bystander.stat("bystander.txt").st_size != 57:
        raise IOError("the bystander's upload has the wrong size")
    bystander.listdir("/")


attempt("bystander session after the hostile cases", bystander_carries_on)
bystander_transport.close()

print(json.dumps(results))
