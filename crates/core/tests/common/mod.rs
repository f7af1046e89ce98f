pub mod dist_run;
