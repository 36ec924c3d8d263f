# A SOCKS5 server that only records: for each connection, the user name it
# was given (RFC 1929) and the destination as sent — a name (socks5h: the
# client resolved nothing) or an address — then refuses it. Prints its port
# first, then one line per connection.
import socket, struct

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(16)
print(s.getsockname()[1], flush=True)


def exactly(c, n):
    data = b""
    while len(data) < n:
        chunk = c.recv(n - len(data))
        if not chunk:
            raise EOFError("closed")
        data += chunk
    return data


while True:
    c, _ = s.accept()
    try:
        c.settimeout(5)
        _, n = exactly(c, 2)
        methods = exactly(c, n)
        user = "-"
        if 2 in methods:
            c.sendall(b"\x05\x02")
            exactly(c, 1)
            user = exactly(c, exactly(c, 1)[0]).decode()
            exactly(c, exactly(c, 1)[0])
            c.sendall(b"\x01\x00")
        else:
            c.sendall(b"\x05\x00")
        atyp = exactly(c, 4)[3]
        if atyp == 3:
            dest = "name:" + exactly(c, exactly(c, 1)[0]).decode()
        elif atyp == 1:
            dest = "ipv4:" + socket.inet_ntoa(exactly(c, 4))
        else:
            dest = "ipv6:" + socket.inet_ntop(socket.AF_INET6, exactly(c, 16))
        port = struct.unpack(">H", exactly(c, 2))[0]
        print(f"user={user} dest={dest} port={port}", flush=True)
        c.sendall(b"\x05\x05\x00\x01" + b"\x00" * 6)
    except Exception as e:
        print(f"error {e}", flush=True)
    finally:
        c.close()
