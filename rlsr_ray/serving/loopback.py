"""Keep a Ray Serve replica's inter-deployment gRPC server on loopback when Ray itself is.

Ray 2.60's Serve replica binds that server to "[::]:0", every interface, with no option to change
it. On a Ray whose node is loopback (the single-node one rlsr_ray starts) nothing needs it from
elsewhere, so a replica calls this from its constructor: Ray starts the server after the user
class is built.
"""


def replica_grpc_on_loopback() -> None:
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):
        return
    original = replica.add_port_to_grpc_server
    replica.add_port_to_grpc_server = lambda server, address: original(server, address.replace("[::]", "127.0.0.1"))
