package broker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"google.golang.org/grpc"
	// Registers grpc-go's client-side health checking: without this import
	// the healthCheckConfig of the service config below is ignored, and a
	// draining replica keeps getting calls until its listener closes.
	_ "google.golang.org/grpc/health"
	"google.golang.org/grpc/resolver"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// A tier is several broker replicas (say the pods behind a headless
// Kubernetes Service) that a client spreads its calls over. Each replica
// serves the standard health service; from the moment it starts draining
// (SIGTERM), "broker.v1.Broker" there is NOT_SERVING.

// tierServiceConfig spreads calls over every replica (round_robin, not the
// default pick_first) and, through grpc.health.v1.Health/Watch on each
// connection, sends none to a replica that is not SERVING. The Python
// client uses the same one.
var tierServiceConfig = `{"loadBalancingConfig":[{"round_robin":{}}],` +
	`"healthCheckConfig":{"serviceName":"` + brokerv1.Broker_ServiceDesc.ServiceName + `"}}`

// isTierTarget says whether a NewClient target names a tier: a "dns:"
// target, which may resolve to many addresses. Any other target (a Unix
// socket, one host:port) is one broker, a sidecar, and keeps gRPC's
// defaults: health checking there would refuse the calls that a draining
// sidecar still serves during its drain delay, with nowhere else to go.
func isTierTarget(target string) bool {
	return strings.HasPrefix(target, "dns:")
}

// checkDNSTarget refuses "dns:" targets that gRPC would read differently
// from what was meant: no port (gRPC would use 443) or no host.
func checkDNSTarget(target string) error {
	rest := strings.TrimPrefix(target, "dns:")
	rest = strings.TrimPrefix(rest, "//")
	// dns://AUTHORITY/host:port names the DNS server; dns:///host:port the
	// system's.
	if i := strings.IndexByte(rest, '/'); i >= 0 {
		rest = rest[i+1:]
	}
	host, port, err := net.SplitHostPort(rest)
	if err != nil || host == "" || port == "" {
		return fmt.Errorf("broker: target %q: a dns target is dns:///name:port, e.g. dns:///mongo-broker.apps.svc.cluster.local:50051", target)
	}
	return checkPort(target, port)
}

func checkPort(address, port string) error {
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("broker: address %q: port %q is not a number from 1 to 65535", address, port)
	}
	return nil
}

// tierAddress is one replica of a list: a TCP address ("10.0.0.5:50051",
// "[fd00::5]:50051") or a Unix socket path.
type tierAddress struct {
	addr string
	unix bool
}

// parseAddresses checks a list of replica addresses and says what each is.
//
// Host names are refused, not resolved: a list is dialled as given, and a
// name resolved once here would go stale when the replicas behind it
// change. A name that resolves to every replica is one "dns:///name:port"
// target, which gRPC resolves again when connections fail.
func parseAddresses(addresses []string) ([]tierAddress, error) {
	if len(addresses) == 0 {
		return nil, errors.New(`broker: no addresses: give at least one "host:port" (or one "dns:///name:port" target to NewClient)`)
	}
	out := make([]tierAddress, 0, len(addresses))
	seen := map[string]bool{}
	var firstUnix, firstTCP string
	for i, raw := range addresses {
		address := strings.TrimSpace(raw)
		if address == "" {
			return nil, fmt.Errorf("broker: address %d of %d is empty", i+1, len(addresses))
		}
		parsed, err := parseAddress(address)
		if err != nil {
			return nil, err
		}
		if seen[parsed.addr] {
			return nil, fmt.Errorf("broker: address %q is listed twice", address)
		}
		seen[parsed.addr] = true
		if parsed.unix && firstUnix == "" {
			firstUnix = address
		} else if !parsed.unix && firstTCP == "" {
			firstTCP = address
		}
		if firstUnix != "" && firstTCP != "" {
			return nil, fmt.Errorf("broker: the addresses mix a unix socket (%q) and TCP (%q): list replicas of one kind", firstUnix, firstTCP)
		}
		out = append(out, parsed)
	}
	return out, nil
}

func parseAddress(address string) (tierAddress, error) {
	if strings.HasPrefix(address, "unix:") || strings.HasPrefix(address, "/") {
		target, err := normalizeTarget(address)
		if err != nil {
			return tierAddress{}, err
		}
		return tierAddress{addr: strings.TrimPrefix(target, "unix://"), unix: true}, nil
	}
	if scheme, _, found := strings.Cut(address, ":"); found && strings.HasPrefix(address, scheme+":/") {
		return tierAddress{}, fmt.Errorf("broker: address %q: a list takes host:port addresses and unix sockets, not %s: targets (a dns:///name:port target goes alone, to NewClient)", address, scheme)
	}
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return tierAddress{}, fmt.Errorf("broker: address %q has no port: write host:port, e.g. 10.0.0.5:50051 or [fd00::5]:50051", address)
	}
	if err := checkPort(address, port); err != nil {
		return tierAddress{}, err
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return tierAddress{}, fmt.Errorf("broker: address %q: %q is a host name; a list takes IP addresses (a name resolved once would go stale): "+
			"give the name as one target, NewClient(\"dns:///%s\"), which reaches every address it resolves to", address, host, address)
	}
	return tierAddress{addr: net.JoinHostPort(ip.String(), port)}, nil
}

// addressScheme is the resolver scheme of a client made by
// NewClientForAddresses; the resolver is the client's own (WithResolvers),
// never registered globally.
const addressScheme = "mongo-broker-addresses"

// staticResolver hands gRPC a fixed list of addresses, each one endpoint,
// so that round_robin has one subchannel per replica.
type staticResolver struct {
	state resolver.State
}

func (r *staticResolver) Build(_ resolver.Target, cc resolver.ClientConn, _ resolver.BuildOptions) (resolver.Resolver, error) {
	if err := cc.UpdateState(r.state); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *staticResolver) Scheme() string                        { return addressScheme }
func (r *staticResolver) ResolveNow(resolver.ResolveNowOptions) {}
func (r *staticResolver) Close()                                {}

// addressDialOptions are the options that make a ClientConn dial the list.
func addressDialOptions(addresses []tierAddress) []grpc.DialOption {
	state := resolver.State{}
	for _, a := range addresses {
		// ServerName is each connection's :authority (and TLS server name):
		// the replica's own address, or "localhost" for a socket, as gRPC's
		// unix resolver has it.
		name := a.addr
		if a.unix {
			name = "localhost"
		}
		address := resolver.Address{Addr: a.addr, ServerName: name}
		state.Endpoints = append(state.Endpoints, resolver.Endpoint{Addresses: []resolver.Address{address}})
	}
	options := []grpc.DialOption{
		grpc.WithResolvers(&staticResolver{state: state}),
		grpc.WithDefaultServiceConfig(tierServiceConfig),
	}
	if len(addresses) > 0 && addresses[0].unix {
		// gRPC's own dialer speaks TCP to an address it did not get from its
		// unix resolver; these addresses are socket paths.
		options = append(options, grpc.WithContextDialer(func(ctx context.Context, path string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
	}
	return options
}

// NewClientForAddresses returns a Client that spreads its calls over the
// broker replicas at addresses: "IP:port" ("10.0.0.5:50051",
// "[fd00::5]:50051"), or Unix sockets (as NewClient takes them), not both.
// Host names are refused: for a name that resolves to every replica, such
// as a headless Kubernetes Service, use NewClient("dns:///name:port").
//
// As with a "dns:" target, calls go round-robin to every replica whose
// health is SERVING; a replica that starts draining gets no new ones. A
// call refused with UNAVAILABLE (a replica draining or gone) is retried, as
// RetryPolicy says, and the next attempt goes to the next ready replica.
// WithDialOptions(grpc.WithDefaultServiceConfig(...)) replaces the
// balancing and health-checking config.
func NewClientForAddresses(addresses []string, opts ...Option) (*Client, error) {
	parsed, err := parseAddresses(addresses)
	if err != nil {
		return nil, err
	}
	names := make([]string, len(parsed))
	for i, a := range parsed {
		names[i] = a.addr
	}
	target := addressScheme + ":///" + strings.Join(names, ",")
	return newClient(target, addressDialOptions(parsed), opts)
}
