//! Root placement: pick a cluster for one instance. Pure function, no I/O.

use oak_proto::v1::{ClusterAggregate, ServiceSpec};
use oak_proto::{arch, InstanceState};
use InstanceState::{NoActiveClusterWithCapacity, TargetClusterNotActive, TargetClusterNotFound};

/// What the scheduler needs to know about a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub id: String,
    pub name: String,
    pub active: bool,
    pub aggregate: ClusterAggregate,
    /// CLUSTER_LOCATION as registered: free text, or "lat,lon[,radius_m]".
    pub location: String,
}

/// "lat,lon[,...]" -> (lat, lon) in degrees, when it is one.
pub fn parse_latlon(s: &str) -> Option<(f64, f64)> {
    let mut it = s.split(',').map(|x| x.trim().parse::<f64>());
    let (lat, lon) = (it.next()?.ok()?, it.next()?.ok()?);
    ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some((lat, lon))
}

/// Great-circle distance in km (haversine, mean Earth radius).
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1, la2, lo2) = (a.0.to_radians(), a.1.to_radians(), b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2) + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}

/// Why a cluster fails the SLA's `geo` constraints (location "lat,lon", threshold in km), if it does.
/// A cluster's own radius (third field of its location, metres) counts in its favour.
fn geo_misfit(spec: &ServiceSpec, location: &str) -> Option<String> {
    for c in spec.constraints.iter().filter(|c| c.r#type == "geo") {
        let Some(target) = parse_latlon(&c.location) else {
            return Some(format!("cannot be checked against geo location {:?} (want \"lat,lon\")", c.location));
        };
        let Some(here) = parse_latlon(location) else {
            return Some(format!("has no lat,lon location (CLUSTER_LOCATION is {location:?}) for the geo constraint"));
        };
        let radius_km = location.split(',').nth(2).and_then(|r| r.trim().parse::<f64>().ok()).unwrap_or(0.0) / 1000.0;
        let d = distance_km(here, target);
        if d - radius_km > c.threshold {
            return Some(format!("is {d:.0} km from {:?}, geo threshold {} km", c.location, c.threshold));
        }
    }
    None
}

/// Why nothing could be placed: the root's `status` (one of the unplaced states, see
/// [`InstanceState::is_unplaced`]; such instances are retried) and a human readable `detail`.
#[derive(Debug, Clone, PartialEq)]
pub struct Unplaced {
    pub status: InstanceState,
    pub detail: String,
}

fn misfit(spec: &ServiceSpec, a: &ClusterAggregate) -> Option<String> {
    if a.active_nodes == 0 {
        return Some("has no active worker".into());
    }
    if !spec.virtualization.is_empty() && !a.virtualization.iter().any(|v| v == &spec.virtualization) {
        return Some(format!("does not offer virtualization '{}' (has {:?})", spec.virtualization, a.virtualization));
    }
    // both sides through the one architecture table: an SLA's "x86_64" is an "amd64" cluster
    if !spec.arch.is_empty() && !a.arch.iter().any(|x| arch::matches(&spec.arch, x)) {
        return Some(format!("has no worker with arch {:?} (has {:?})", spec.arch, a.arch));
    }
    if spec.vcpus > a.max_free_cpu_cores + 1e-9 {
        return Some(format!(
            "largest free CPU on one worker is {:.2} cores, {} requested",
            a.max_free_cpu_cores, spec.vcpus
        ));
    }
    if spec.memory_mb > a.max_free_memory_mb {
        return Some(format!(
            "largest free memory on one worker is {} MB, {} MB requested",
            a.max_free_memory_mb, spec.memory_mb
        ));
    }
    if spec.vgpus > a.max_free_gpus {
        return Some(format!("largest free GPU count on one worker is {}, {} requested", a.max_free_gpus, spec.vgpus));
    }
    None
}

/// Chooses a cluster id for `spec`, skipping clusters in `tried`.
pub fn place(spec: &ServiceSpec, clusters: &[ClusterView], tried: &[String]) -> Result<String, Unplaced> {
    let targets: Vec<&str> = spec
        .constraints
        .iter()
        .filter(|c| c.r#type == "direct" || c.r#type == "clusters")
        .flat_map(|c| {
            let mut v: Vec<&str> = c.allowed.iter().map(String::as_str).collect();
            if !c.cluster.is_empty() {
                v.push(c.cluster.as_str());
            }
            v
        })
        .collect();
    let mut candidates: Vec<&ClusterView> = clusters.iter().collect();
    if !targets.is_empty() {
        candidates.retain(|c| targets.contains(&c.name.as_str()));
        if candidates.is_empty() {
            return Err(Unplaced {
                status: TargetClusterNotFound,
                detail: format!("NoTargetCluster: target cluster {targets:?} is not registered"),
            });
        }
        if !candidates.iter().any(|c| c.active) {
            return Err(Unplaced {
                status: TargetClusterNotActive,
                detail: format!("NoTargetCluster: target cluster {targets:?} is registered but not active"),
            });
        }
    } else if candidates.is_empty() {
        return Err(Unplaced {
            status: NoActiveClusterWithCapacity,
            detail: "NoTargetCluster: no cluster is registered".into(),
        });
    } else if !candidates.iter().any(|c| c.active) {
        return Err(Unplaced {
            status: NoActiveClusterWithCapacity,
            detail: format!("NoTargetCluster: none of the {} registered clusters is active", candidates.len()),
        });
    }
    candidates.retain(|c| c.active);
    let mut reasons = Vec::new();
    let mut fits: Vec<&ClusterView> = Vec::new();
    for c in candidates {
        if tried.contains(&c.id) {
            reasons.push(format!("cluster '{}' already tried", c.name));
        } else if let Some(why) = misfit(spec, &c.aggregate)
            .or_else(|| geo_misfit(spec, &c.location))
            .or_else(|| crate::latency::cluster_misfit(&c.aggregate, &spec.latency))
        {
            reasons.push(format!("cluster '{}' {why}", c.name));
        } else {
            fits.push(c);
        }
    }
    let best = fits.into_iter().max_by(|a, b| {
        let ka = (a.aggregate.max_free_cpu_cores, a.aggregate.max_free_memory_mb);
        let kb = (b.aggregate.max_free_cpu_cores, b.aggregate.max_free_memory_mb);
        ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal).then_with(|| b.name.cmp(&a.name))
    });
    match best {
        Some(c) => Ok(c.id.clone()),
        None => Err(Unplaced {
            status: NoActiveClusterWithCapacity,
            detail: format!(
                "NoResourcesAvailable: asked for {} vcpus, {} MB memory, {} gpus, {} ({}); {}",
                spec.vcpus,
                spec.memory_mb,
                spec.vgpus,
                spec.virtualization,
                if spec.arch.is_empty() { "any arch".to_string() } else { spec.arch.join("|") },
                reasons.join("; ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oak_proto::v1::Constraint;

    fn cl(id: &str, active: bool, cpu: f64, mem: u64) -> ClusterView {
        ClusterView {
            id: id.into(),
            name: format!("n{id}"),
            active,
            location: String::new(),
            aggregate: ClusterAggregate {
                active_nodes: 1,
                max_free_cpu_cores: cpu,
                max_free_memory_mb: mem,
                virtualization: vec!["container".into()],
                arch: vec!["amd64".into()],
                ..Default::default()
            },
        }
    }
    fn spec(cpu: f64, mem: u64) -> ServiceSpec {
        ServiceSpec { vcpus: cpu, memory_mb: mem, virtualization: "container".into(), ..Default::default() }
    }

    #[test]
    fn no_clusters_and_inactive() {
        let e = place(&spec(1.0, 10), &[], &[]).unwrap_err();
        assert_eq!(e.status, NoActiveClusterWithCapacity);
        assert!(e.detail.starts_with("NoTargetCluster: "));
        let e = place(&spec(1.0, 10), &[cl("1", false, 8.0, 1000)], &[]).unwrap_err();
        assert!(e.detail.starts_with("NoTargetCluster: "), "{}", e.detail);
    }

    #[test]
    fn ranks_by_free_capacity_and_skips_tried() {
        let cs = [cl("1", true, 2.0, 1000), cl("2", true, 4.0, 1000), cl("3", false, 16.0, 9000)];
        assert_eq!(place(&spec(1.0, 10), &cs, &[]).unwrap(), "2");
        assert_eq!(place(&spec(1.0, 10), &cs, &["2".into()]).unwrap(), "1");
        let e = place(&spec(1.0, 10), &cs, &["1".into(), "2".into()]).unwrap_err();
        assert_eq!(e.status, NoActiveClusterWithCapacity);
        assert!(e.detail.starts_with("NoResourcesAvailable: "), "{}", e.detail);
    }

    #[test]
    fn filters_resources_virt_arch() {
        let cs = [cl("1", true, 2.0, 1000)];
        let e = place(&spec(3.0, 10), &cs, &[]).unwrap_err();
        assert!(e.detail.contains("largest free CPU"), "{}", e.detail);
        assert!(place(&spec(1.0, 2000), &cs, &[]).unwrap_err().detail.contains("memory"));
        let mut s = spec(1.0, 10);
        s.virtualization = "unikernel".into();
        assert!(place(&s, &cs, &[]).unwrap_err().detail.contains("unikernel"));
        let mut s = spec(1.0, 10);
        s.arch = vec!["arm64".into()];
        assert!(place(&s, &cs, &[]).is_err());
        s.arch = vec!["arm64".into(), "amd64".into()];
        assert!(place(&s, &cs, &[]).is_ok());
        let mut s = spec(1.0, 10);
        s.vgpus = 1;
        assert!(place(&s, &cs, &[]).unwrap_err().detail.contains("GPU"));
    }

    #[test]
    fn an_x86_64_sla_is_placed_on_an_amd64_cluster() {
        let mut s = spec(1.0, 10);
        s.arch = vec!["x86_64".into()];
        assert_eq!(place(&s, &[cl("1", true, 2.0, 1000)], &[]).unwrap(), "1");
    }

    #[test]
    fn an_arm64_sla_is_refused_by_an_amd64_cluster_for_its_arch() {
        let mut s = spec(1.0, 10);
        s.arch = vec!["arm64".into()];
        let e = place(&s, &[cl("1", true, 2.0, 1000)], &[]).unwrap_err();
        assert_eq!(e.status, NoActiveClusterWithCapacity);
        assert!(e.detail.contains("cluster 'n1' has no worker with arch [\"arm64\"]"), "{}", e.detail);
    }

    #[test]
    fn direct_constraint() {
        let cs = [cl("1", true, 2.0, 1000), cl("2", true, 8.0, 1000), cl("3", false, 8.0, 1000)];
        let mut s = spec(1.0, 10);
        s.constraints = vec![Constraint { r#type: "direct".into(), cluster: "n1".into(), ..Default::default() }];
        assert_eq!(place(&s, &cs, &[]).unwrap(), "1");
        s.constraints[0].cluster = "nope".into();
        let e = place(&s, &cs, &[]).unwrap_err();
        assert_eq!(e.status, TargetClusterNotFound);
        assert!(e.detail.starts_with("NoTargetCluster: "));
        s.constraints[0].cluster = "n3".into();
        assert_eq!(place(&s, &cs, &[]).unwrap_err().status, TargetClusterNotActive);
    }

    #[test]
    fn geo_constraint_keeps_clusters_within_the_threshold() {
        let mut munich = cl("m", true, 4.0, 4096);
        munich.location = "48.137,11.575,5000".into();
        let mut berlin = cl("b", true, 8.0, 8192);
        berlin.location = "52.52,13.405".into();
        let mut nowhere = cl("x", true, 16.0, 16384);
        nowhere.location = "rack 4".into();
        let cs = vec![munich, berlin, nowhere];
        let mut s = spec(1.0, 100);
        s.constraints = vec![Constraint {
            r#type: "geo".into(),
            location: "48.26,11.67".into(),
            threshold: 50.0,
            ..Default::default()
        }];
        assert_eq!(place(&s, &cs, &[]).unwrap(), "m", "only Munich is within 50 km of Garching");
        s.constraints[0].threshold = 600.0;
        assert_eq!(place(&s, &cs, &[]).unwrap(), "b", "within 600 km the bigger Berlin wins");
        s.constraints[0].location = "-33.86,151.2".into();
        let e = place(&s, &cs, &[]).unwrap_err();
        assert!(e.detail.contains("km from") && e.detail.contains("no lat,lon location"), "{}", e.detail);
        let d = distance_km((48.137, 11.575), (52.52, 13.405));
        assert!((d - 504.0).abs() < 5.0, "{d}");
    }
    #[test]
    fn latency_constraint_filters_clusters_by_their_coordinate_summary() {
        use oak_proto::v1::{LatencyPoint, LatencyTarget, NetCoordinate};
        let at = |x: f64| NetCoordinate { position: vec![x, 0.0], height: 100.0, error: 0.1 };
        let mut near = cl("near", true, 2.0, 1000);
        (near.aggregate.coordinate, near.aggregate.coordinate_radius_us) = (Some(at(3_000.0)), 1_000.0);
        let mut far = cl("far", true, 8.0, 8000);
        (far.aggregate.coordinate, far.aggregate.coordinate_radius_us) = (Some(at(40_000.0)), 1_000.0);
        let unmeasured = cl("blind", true, 16.0, 16000);
        let mut s = spec(1.0, 100);
        s.latency = vec![LatencyTarget {
            kind: "area".into(),
            name: "users".into(),
            threshold_ms: 10.0,
            points: vec![LatencyPoint { node_name: "u".into(), coordinate: Some(at(0.0)) }],
            convergence_time_s: 0,
        }];
        let cs = [near.clone(), far.clone(), unmeasured];
        assert_eq!(place(&s, &cs, &[]).unwrap(), "near", "the bigger clusters are too far or unmeasured");
        let e = place(&s, &[far, cs[2].clone()], &[]).unwrap_err();
        assert_eq!(e.status, NoActiveClusterWithCapacity);
        assert!(e.detail.starts_with("NoResourcesAvailable: "), "{}", e.detail);
        assert!(
            e.detail.contains(
                "cluster 'nfar' is at least 39.2 ms from area 'users', latency threshold 10 ms (29.2 ms over)"
            ),
            "{}",
            e.detail
        );
        assert!(e.detail.contains("cluster 'nblind' has no worker with a settled network coordinate"), "{}", e.detail);
    }
}
