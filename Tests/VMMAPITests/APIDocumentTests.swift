import Foundation
import Testing
import Yams
@testable import VMMAPI

/// docs/vmm-api.yaml documents exactly what the router serves.
struct APIDocumentTests {
    static let documentURL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("docs/vmm-api.yaml")

    func document() throws -> [String: Any] {
        let text = try String(contentsOf: Self.documentURL, encoding: .utf8)
        return try #require(try Yams.load(yaml: text) as? [String: Any])
    }

    @Test func documentsEveryRouteAndNothingElse() throws {
        let doc = try document()
        #expect((doc["openapi"] as? String)?.hasPrefix("3.") == true)
        let paths = try #require(doc["paths"] as? [String: Any])
        var documented = Set<APIRoute>()
        for (path, item) in paths {
            let operations = try #require(item as? [String: Any], "\(path)")
            for method in operations.keys where ["get", "put", "patch", "post", "delete", "head", "options"].contains(method) {
                documented.insert(APIRoute(method.uppercased(), path))
            }
        }
        let served = Set(APIRouter.routes)
        #expect(documented.subtracting(served).isEmpty, "documented, not served")
        #expect(served.subtracting(documented).isEmpty, "served, not documented")
    }

    @Test func everyOperationDocumentsItsSuccessAndTheErrorBody() throws {
        let doc = try document()
        let paths = try #require(doc["paths"] as? [String: Any])
        for route in APIRouter.routes {
            let op = try #require((paths[route.path] as? [String: Any])?[route.method.lowercased()] as? [String: Any], "\(route)")
            let responses = try #require(op["responses"] as? [String: Any], "\(route)")
            let success = route.method == "GET" ? "200" : "204"
            #expect(responses[success] != nil, "\(route) documents no \(success)")
            let bad = try #require(responses["400"] as? [String: Any], "\(route) documents no 400")
            #expect(bad["$ref"] as? String == "#/components/responses/BadRequest", "\(route)")
            if route.method != "GET" { #expect(op["requestBody"] != nil, "\(route) documents no body") }
            if route.path.contains("{") { #expect(op["parameters"] != nil, "\(route) documents no path parameter") }
        }
        let schemas = try #require((doc["components"] as? [String: Any])?["schemas"] as? [String: Any])
        let error = try #require(schemas["Error"] as? [String: Any])
        #expect((error["properties"] as? [String: Any])?["fault_message"] != nil)
    }

    /// The documented body fields are the ones the router accepts (it refuses unknown fields).
    @Test func documentedFieldsMatchTheBodies() throws {
        let doc = try document()
        let schemas = try #require((doc["components"] as? [String: Any])?["schemas"] as? [String: Any])
        func fields(_ name: String) -> Set<String> {
            Set(((schemas[name] as? [String: Any])?["properties"] as? [String: Any])?.keys.map { $0 } ?? [])
        }
        #expect(fields("MachineConfiguration") == Set(MachineConfig.jsonKeys))
        #expect(fields("MachineConfigurationUpdate") == Set(MachineConfig.jsonKeys))
        let encoder = JSONEncoder()
        func keys(_ value: some Encodable) throws -> Set<String> {
            Set(try #require(try JSONSerialization.jsonObject(with: encoder.encode(value)) as? [String: Any]).keys)
        }
        #expect(fields("Drive") == (try keys(Drive(driveId: "a", pathOnHost: "b", isReadOnly: true, partuuid: "c", cacheType: "Unsafe", ioEngine: "Sync"))))
        #expect(fields("NetworkInterface") == (try keys(NetworkInterface(ifaceId: "a", hostDevName: "b", guestMac: "c"))))
        #expect(fields("Vsock") == (try keys(Vsock(guestCid: 3, udsPath: "a", vsockId: "b"))))
        #expect(fields("Logger") == (try keys(Logger(logPath: "a", level: "b", showLevel: true, showLogOrigin: true, module: "c"))))
        #expect(fields("BootSource") == (try keys(BootSource(kernelImagePath: "a", initrdPath: "b", bootArgs: "c"))))
        #expect(fields("Metrics") == (try keys(Metrics(metricsPath: "a"))))
        #expect(fields("Balloon") == Set(Balloon.jsonKeys))
        #expect(fields("Balloon") == (try keys(Balloon(amountMib: 1, deflateOnOom: true, statsPollingIntervalS: 1, freePageReporting: true))))
        let stats = try keys(BalloonStatistics(targetPages: 1, actualPages: 1, guest: Dictionary(uniqueKeysWithValues: BalloonStatistics.guestFields.map { ($0, 1) })))
        #expect(fields("BalloonStats") == stats)
        #expect(fields("FullVmConfiguration") == (try keys(VMConfiguration(bootSource: BootSource(kernelImagePath: "k"), vsock: Vsock(guestCid: 3, udsPath: "u"),
                                                                           logger: Logger(logPath: "l"), metrics: Metrics(metricsPath: "m"), balloon: Balloon(amountMib: 1, deflateOnOom: true)))))
    }
}
