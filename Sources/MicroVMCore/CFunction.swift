import Glibc

/// A C library function the Swift Glibc module leaves out (<sys/eventfd.h>, <sys/timerfd.h>, …),
/// looked up by name; nil on a C library without it. `F` is its `@convention(c)` type.
public func cFunction<F>(_ name: String, as type: F.Type) -> F? {
    guard let sym = dlsym(nil, name) else { return nil }
    return unsafeBitCast(sym, to: type)
}
