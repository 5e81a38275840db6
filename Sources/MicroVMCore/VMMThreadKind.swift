/// The kinds of thread a VMM runs. A jailed VMM confines each to the system calls of its kind
/// (`Jail.confine`) as the thread starts: a vCPU thread cannot accept a connection, the API
/// thread cannot run a vCPU, no thread can open a file or start a program.
public enum VMMThreadKind: String, Sendable, CaseIterable {
    /// Runs one vCPU: KVM_RUN and the exits it serves (port and MMIO devices, the console).
    case vcpu
    /// A virtio device's I/O thread: its queues, its disk or tap, its interrupts.
    case device
    /// The control API's thread: the socket's connections, and pause, resume, Ctrl-Alt-Del.
    case api
}
