"""Per-connection and per-session limits probed with paramiko, which sends what OpenSSH will not.

Usage:
  limits.py auth-cap HOST PORT USER ATTEMPTS
      Offers ATTEMPTS wrong (freshly generated) keys on one connection, each a signed publickey
      request. Prints {"refused": n, "then": "disconnected"|"accepted"|"still open", "disconnect": msg}.
  limits.py handle-caps HOST PORT USER KEY
      Opens uploads and folder listings until the session's caps refuse one, closes one and opens
      again. Prints case name -> outcome ("handle", "status CODE: MESSAGE", a count).
  limits.py rsa HOST PORT USER RSA_KEY
      Logs in with the same RSA key twice: signing with ssh-rsa (SHA-1, forced onto the wire even
      though the server does not list it) and with rsa-sha2-256. Prints each outcome and what the
      server offered (host key type, server-sig-algs).
  limits.py upload HOST PORT USER KEY NAME
      A normal session: uploads NAME (its own name as content) and stats it. Prints {"upload": "ok"}.

Every network wait has a timeout, so a server that hangs makes this fail rather than block.
"""
import json
import logging
import sys
import threading

import paramiko
from cryptography.hazmat.primitives import hashes
from paramiko import sftp as proto
from paramiko.auth_handler import AuthHandler

TIMEOUT = 20


def transport(host, port):
    client = paramiko.Transport((host, int(port)))
    client.banner_timeout = TIMEOUT
    client.auth_timeout = TIMEOUT
    client.start_client(timeout=TIMEOUT)
    return client


def connect(host, port, user, key_file):
    client = transport(host, port)
    client.auth_publickey(user, paramiko.PKey.from_path(key_file))
    return client, paramiko.SFTPClient.from_transport(client)


class Disconnects(logging.Handler):
    """Keeps paramiko's 'Disconnect (code N): message' log lines."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def emit(self, record):
        text = record.getMessage()
        if text.startswith("Disconnect"):
            self.seen.append(text)


def auth_again(client, user, key):
    """A further publickey request on a connection already in user authentication.

    paramiko's auth_publickey sends SERVICE_REQUEST before every attempt, which russh answers only
    once; so after the first attempt this sends the USERAUTH_REQUEST alone, as OpenSSH does."""
    event = threading.Event()
    handler = AuthHandler(client)
    handler.auth_event = event
    handler.auth_method = "publickey"
    handler.username = user
    handler.private_key = key
    client.auth_handler = handler
    accept = paramiko.Message()
    accept.add_string("ssh-userauth")
    accept.rewind()
    with client.lock:
        handler._parse_service_accept(accept)
    return handler.wait_for_response(event)


def auth_cap(host, port, user, attempts):
    disconnects = Disconnects()
    logging.getLogger("paramiko").addHandler(disconnects)
    logging.getLogger("paramiko").setLevel(logging.INFO)
    client = transport(host, port)
    refused = 0
    then = "still open"
    for attempt in range(int(attempts)):
        key = paramiko.ECDSAKey.generate()
        try:
            if attempt == 0:
                client.auth_publickey(user, key)
            else:
                auth_again(client, user, key)
            then = "accepted"
            break
        except (paramiko.SSHException, EOFError, OSError):
            if not client.is_active():
                then = "disconnected"
                break
            refused += 1
    client.close()
    return {"refused": refused, "then": then, "disconnect": "; ".join(disconnects.seen)}


class Requests:
    """Raw SFTP requests on one session, each answered before the next is sent."""

    def __init__(self, sftp):
        self.sftp = sftp
        self.next_id = 7000

    def call(self, kind, *fields):
        message = paramiko.Message()
        message.add_int(self.next_id)
        self.next_id += 1
        for field in fields:
            if isinstance(field, int):
                message.add_int(field)
            elif isinstance(field, paramiko.SFTPAttributes):
                field._pack(message)
            else:
                message.add_string(field)
        self.sftp._send_packet(kind, message)
        reply_type, data = self.sftp._read_packet()
        reply = paramiko.Message(data)
        reply.get_int()
        if reply_type == proto.CMD_HANDLE:
            return "handle", reply.get_binary()
        if reply_type == proto.CMD_STATUS:
            code = reply.get_int()
            return "status %d: %s" % (code, reply.get_text()), None
        return "type %d" % reply_type, None

    def open_upload(self, name):
        flags = proto.SFTP_FLAG_WRITE | proto.SFTP_FLAG_CREATE | proto.SFTP_FLAG_TRUNC
        return self.call(proto.CMD_OPEN, name, flags, paramiko.SFTPAttributes())

    def open_folder(self, path):
        return self.call(proto.CMD_OPENDIR, path)

    def close(self, handle):
        return self.call(proto.CMD_CLOSE, handle)[0]


def handle_caps(host, port, user, key):
    results = {}
    client, sftp = connect(host, port, user, key)
    sftp.sock.settimeout(TIMEOUT)
    requests = Requests(sftp)

    def fill(kind, open_one):
        """Opens handles until the server refuses one, closes one, opens one more; returns them."""
        handles = []
        while len(handles) < 64:
            outcome, handle = open_one(len(handles))
            if handle is None:
                results[kind + " refused"] = outcome
                break
            handles.append(handle)
        results[kind + "s opened"] = len(handles)
        results["close one " + kind] = requests.close(handles.pop(0))
        outcome, handle = open_one("again")
        results[kind + " after closing one"] = outcome
        if handle is not None:
            handles.append(handle)
        return handles

    uploads = fill("upload", lambda index: requests.open_upload("cap-%s.txt" % index))
    folders = fill("folder", lambda index: requests.open_folder("/"))

    closed = [requests.close(handle) for handle in uploads + folders]
    results["close the rest"] = "ok" if all(c == "status 0: OK" for c in closed) else str(closed)
    with sftp.open("same-session.txt", "w") as upload:
        upload.write(b"same session")
    results["same session afterwards"] = "ok"
    client.close()
    return results


def rsa(host, port, user, key_file):
    results = {}
    key = paramiko.RSAKey.from_private_key_file(key_file)

    def login(name, algorithm):
        client = transport(host, port)
        results["host key type"] = client.host_key.get_name()
        try:
            if algorithm == "ssh-rsa":
                # paramiko no longer signs with SHA-1, and would not pick an algorithm the server
                # leaves out of server-sig-algs: make it do both, as an old or hostile client would.
                paramiko.RSAKey.HASHES["ssh-rsa"] = hashes.SHA1
                AuthHandler._finalize_pubkey_algorithm = sha1
            else:
                AuthHandler._finalize_pubkey_algorithm = original
                client.disabled_algorithms = {"pubkeys": ["rsa-sha2-512"]}
            client.auth_publickey(user, key)
            results[name] = "accepted as %s" % client._agreed_pubkey_algorithm
            sftp = paramiko.SFTPClient.from_transport(client)
            sftp.listdir("/")
            results[name + " session"] = "ok"
        except paramiko.AuthenticationException as error:
            results[name] = "refused: %s" % error
        sig_algs = client.server_extensions.get("server-sig-algs", b"").decode()
        results["server-sig-algs"] = sig_algs
        client.close()

    def sha1(handler, key_type):
        handler.transport._agreed_pubkey_algorithm = "ssh-rsa"
        return "ssh-rsa"

    original = AuthHandler._finalize_pubkey_algorithm
    login("ssh-rsa", "ssh-rsa")
    login("rsa-sha2-256", "rsa-sha2-256")
    return results


def upload(host, port, user, key, name):
    client, sftp = connect(host, port, user, key)
    sftp.sock.settimeout(TIMEOUT)
    with sftp.open(name, "w") as handle:
        handle.write(name.encode())
    sftp.stat(name)
    client.close()
    return {"upload": "ok"}


COMMANDS = {"auth-cap": auth_cap, "handle-caps": handle_caps, "rsa": rsa, "upload": upload}

if __name__ == "__main__":
    print(json.dumps(COMMANDS[sys.argv[1]](*sys.argv[2:])))
