//! Scaling a service to a number of instances, through the root's one-instance verbs (Oakestra's API has
//! deploy-one and undeploy-one; no "set the count").

use crate::model::Instance;

/// The most instances one scale action asks for: a typing slip (30000 for 3) must not flood the root.
pub const MAX_INSTANCES: u32 = 64;

/// What scaling to `target` does with `instances` (the service's instance list): how many to deploy, and
/// which to undeploy. Instances already being undeployed do not count. Those not running go first (a
/// failed or unplaced one does no work), then the newest.
pub fn plan(instances: &[Instance], target: u32) -> (u32, Vec<u32>) {
    let mut live: Vec<&Instance> = instances.iter().filter(|i| !i.undeploying).collect();
    let have = live.len() as u32;
    if target >= have {
        return (target - have, Vec::new());
    }
    live.sort_by_key(|i| (i.status == "RUNNING", std::cmp::Reverse(i.instance_number)));
    (0, live.iter().take((have - target) as usize).map(|i| i.instance_number).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(n: u32, status: &str, undeploying: bool) -> Instance {
        Instance { instance_number: n, status: status.into(), undeploying, ..Default::default() }
    }

    #[test]
    fn up_counts_only_instances_not_being_undeployed() {
        let l = [inst(0, "RUNNING", false), inst(1, "RUNNING", true)];
        assert_eq!(plan(&l, 3), (2, vec![]));
        assert_eq!(plan(&l, 1), (0, vec![]));
    }

    #[test]
    fn down_takes_the_idle_first_then_the_newest() {
        let l =
            [inst(0, "RUNNING", false), inst(1, "FAILED", false), inst(2, "RUNNING", false), inst(3, "RUNNING", false)];
        assert_eq!(plan(&l, 3), (0, vec![1]));
        assert_eq!(plan(&l, 1), (0, vec![1, 3, 2]));
        assert_eq!(plan(&l, 0), (0, vec![1, 3, 2, 0]));
    }
}
