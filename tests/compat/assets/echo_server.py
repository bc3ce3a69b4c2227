"""An HTTP + WebSocket echo server on the standard library only (the sandbox image has no `websockets`).

Run inside a sandbox by tests/compat/test_ports.py: `python3 echo_server.py PORT`. A WebSocket upgrade gets an
echo of text and binary messages (pings answered, close replied to; subprotocol "echo" when asked); any other
request gets its body back as a chunked response, with its method, path and Host in `X-Echo-*` headers
(except `/garbage`, answered with bytes that are not HTTP, `/close`, answered by hanging up, and `/truncate`,
a body cut short).
"""

import base64
import hashlib
import socketserver
import struct
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def read_exact(rfile, n):
    data = rfile.read(n)
    if len(data) < n:
        raise EOFError
    return data


def send_frame(wfile, opcode, payload):
    header = bytes([0x80 | opcode])
    if len(payload) < 126:
        header += bytes([len(payload)])
    elif len(payload) < 1 << 16:
        header += bytes([126]) + struct.pack(">H", len(payload))
    else:
        header += bytes([127]) + struct.pack(">Q", len(payload))
    wfile.write(header + payload)
    wfile.flush()


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        headers = {}
        request_line = self.rfile.readline().decode().split()
        while (line := self.rfile.readline().strip()):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        if headers.get("upgrade", "").lower() != "websocket":
            self.echo_http(request_line, headers)
            return
        accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + GUID).digest())
        reply = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        reply += b"Sec-WebSocket-Accept: " + accept + b"\r\n"
        if "echo" in headers.get("sec-websocket-protocol", ""):
            reply += b"Sec-WebSocket-Protocol: echo\r\n"
        self.wfile.write(reply + b"\r\n")
        self.wfile.flush()
        message, message_opcode = b"", 0
        try:
            while True:
                first, second = read_exact(self.rfile, 2)
                fin, opcode, length = first & 0x80, first & 0x0F, second & 0x7F
                if length == 126:
                    (length,) = struct.unpack(">H", read_exact(self.rfile, 2))
                elif length == 127:
                    (length,) = struct.unpack(">Q", read_exact(self.rfile, 8))
                mask = read_exact(self.rfile, 4) if second & 0x80 else b"\0\0\0\0"
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(read_exact(self.rfile, length)))
                if opcode == 8:
                    send_frame(self.wfile, 8, payload[:2])
                    return
                if opcode == 9:
                    send_frame(self.wfile, 10, payload)
                    continue
                if opcode in (1, 2):
                    message, message_opcode = payload, opcode
                elif opcode == 0:
                    message += payload
                if fin and opcode in (0, 1, 2):
                    send_frame(self.wfile, message_opcode, message)
        except EOFError:
            return


    def echo_http(self, request_line, headers):
        if request_line[1] == "/garbage":  # not HTTP at all
            self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
            return
        if request_line[1] == "/close":  # hang up without an answer
            return
        if request_line[1] == "/truncate":  # promise 100 bytes, send 10, hang up
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            return
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while (size := int(self.rfile.readline().strip() or b"0", 16)):
                body += read_exact(self.rfile, size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = read_exact(self.rfile, int(headers.get("content-length", "0")))
        head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        head += f"X-Echo-Method: {request_line[0]}\r\nX-Echo-Path: {request_line[1]}\r\nX-Echo-Host: {headers.get('host', '')}\r\n\r\n"
        self.wfile.write(head.encode())
        for start in range(0, len(body), 65536):
            piece = body[start : start + 65536]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


if __name__ == "__main__":
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
